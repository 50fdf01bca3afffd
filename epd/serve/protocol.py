"""The OpenAI wire format EPD serves (chat completions, completions), validated by pydantic.

Requests are strict: an unknown field is refused with a 400 naming it, and fields EPD knows but does
not implement (tools, structured output, audio) are refused unless they ask for nothing. No field is
accepted and then ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from epd.request import MAX_LOGIT_BIAS, MAX_SEED, MAX_TOP_LOGPROBS

Strict = ConfigDict(extra="forbid")


class ImageURL(BaseModel):
    model_config = Strict
    url: StrictStr
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: StrictStr


class ImagePart(BaseModel):
    model_config = Strict
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    model_config = Strict
    url: StrictStr


class VideoPart(BaseModel):
    """A video as vLLM takes one: a base64 data URL (data:video/mp4;base64,...) or a path under the
    server's image root; sampled into frames on arrival (`server.video_fps`, `server.max_video_frames`)."""

    model_config = Strict
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = Strict
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[StrictStr, list[ContentPart], None] = None
    name: Optional[StrictStr] = None


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: StrictBool = False
    # Every chunk carries the usage so far, and every engine step that produced tokens sends a chunk
    # even where its text is not final yet (empty content): a client times each token (as vLLM's option).
    continuous_usage_stats: StrictBool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr


class SamplingFields(BaseModel):
    """What chat completions and completions share."""

    model_config = Strict
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: Optional[StrictInt] = Field(default=None, ge=-1)  # -1 or 0: off; above the vocabulary: off
    min_tokens: StrictInt = Field(default=0, ge=0)
    seed: Optional[StrictInt] = Field(default=None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: Union[StrictStr, list[StrictStr], None] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = Field(default=1, ge=1, le=16)
    ignore_eos: StrictBool = False
    answer_tokens: Optional[StrictInt] = Field(default=None, ge=1)  # benchmarks: the answer ends with EOS at this length
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    logit_bias: Optional[dict[StrictStr, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS, allow_inf_nan=False)]]] = None
    user: Optional[StrictStr] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None  # only {"type": "text"}
    tools: Optional[list[dict]] = None  # only none or empty
    tool_choice: Optional[Union[Literal["none", "auto"], dict]] = None  # only without tools


class CompletionRequest(SamplingFields):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False  # only false
    suffix: Optional[StrictStr] = None  # only none
    best_of: Optional[StrictInt] = Field(default=None, ge=1)  # only equal to n


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprobOut]] = None
    refusal: Optional[list[TokenLogprobOut]] = None


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: Optional[str]
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: Optional[list[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[CompletionLogprobs] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "epd"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
