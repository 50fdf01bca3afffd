"""The simulation: SimPy processes drive the engine's own Pipeline (admission, routing, schedulers,
block accounting) and a latency model stands in for the workers. Same events as the engine."""

from __future__ import annotations

import simpy

from epd.config import COPIES_ON_SEND, DeploymentConfig
from epd.models.family import ModelFamily
from epd.request import Request
from epd.run_result import BatchRecord, RunResult, batch_rows, batch_stats
from epd.stages.instance import Instance
from epd.stages.pipeline import Pipeline
from epd.stages.work import (
    Batch,
    DecodeBatch,
    DecodeResult,
    EncodeBatch,
    EncodedItem,
    EncodeResult,
    MixedBatch,
    MixedResult,
    PrefillBatch,
    PrefilledItem,
    PrefillResult,
    Result,
    SwitchBatch,
    SwitchResult,
    prepared_first,
)
from simulator.latency import DecodeShape, EncodeShape, LatencyModel, PrefillShape
from simulator.shapes import ModelShape

SENT = "sim"  # stands for a transfer handle: the data is "elsewhere"


class Simulation:
    def __init__(
        self,
        deployment: DeploymentConfig,
        family: ModelFamily,
        shape: ModelShape,
        latency: LatencyModel,
        sample_interval: float = 0.25,
        tokenizer=None,
        shared_cores: int = 0,
        allocation=None,  # an AllocationController, ticking on the simulated clock
        switch_cost_s: float = 0.5,  # a worker's reload when it changes stage
    ):
        self.env = simpy.Environment()
        # A sender's blocks are free when the engine's backend frees them: at send (object_store, which
        # copies the data out) or once the pulling batch has completed (ipc, nccl, local).
        frees = deployment.transfer in COPIES_ON_SEND
        self.pipe = Pipeline(deployment, family, frees_on_send=frees, time_origin=0.0, tokenizer=tokenizer)
        self.shape, self.lat = shape, latency
        text = family.text_config()
        self.eos = text.eos_token_id
        self.token = (text.eos_token_id + 1) % text.vocab_size  # any token but EOS
        self.sample_interval = sample_interval
        self.shared_cores = shared_cores
        self.timeseries: list[dict] = []
        # object_store: the sender puts (host copy), the receiver gets: half each. ipc/nccl/local: the
        # receiver's batch waits for the whole copy, the sender's compute goes on.
        self.send_share = 0.5 if deployment.transfer == "object_store" else 0.0
        self.allocation = allocation
        if allocation is not None and hasattr(allocation.policy, "inline"):
            allocation.policy.inline = True
        self.switch_cost_s = switch_cost_s
        self._waiting: dict[str, simpy.Event] = {}
        self._prep_free: dict[str, float] = {}  # per instance: when its host cores finish the encode batches sent so far
        self._arrivals_done = False
        self.batches: list[BatchRecord] = []  # as the engine keeps them: each batch's send, start and end, on the run's clock

    def run(self, requests: list[Request]) -> RunResult:
        self.env.process(self._arrivals(sorted(requests, key=lambda r: r.arrival_time)))
        for inst in self.pipe.instances.values():
            self.env.process(self._serve(inst))
        if self.sample_interval > 0:
            self.env.process(self._sample())
        if self.allocation is not None:
            self.env.process(self._allocate())
        self.env.run()
        if not self.pipe.idle():
            stuck = [s.rid for s in self.pipe.states.values() if not s.done][:8]
            raise RuntimeError(f"simulation stalled with requests in flight: {stuck}")
        self.pipe.assert_drained()
        stage_load = list(self.allocation.stage_load) if self.allocation is not None else []
        return RunResult(
            self.pipe.events,
            dict(self.pipe.outputs),
            [],
            self.timeseries,
            stage_load,
            batch_stats=batch_stats(self.batches),
            batches=batch_rows(self.batches, 0.0),
        )

    # ---- processes ---------------------------------------------------------------------
    def _finished(self) -> bool:
        return self._arrivals_done and self.pipe.idle()

    def _wake_all(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for ev in waiting.values():
            ev.succeed()

    def _arrivals(self, requests: list[Request]):
        for req in requests:
            if req.arrival_time > self.env.now:
                yield self.env.timeout(req.arrival_time - self.env.now)
            self.pipe.add_request(req, self.env.now)
            self._wake_all()
        self._arrivals_done = True
        self._wake_all()

    def _serve(self, inst: Instance):
        """The driver's side of one instance: dispatch batches as the pipeline allows (with async
        scheduling the next while one runs), each run by `_execute` on the instance's worker."""
        worker = simpy.Resource(self.env, capacity=1)
        while True:
            batch = self.pipe.dispatch(inst)
            if batch is None:
                if self._finished() and not inst.inflight:
                    return
                ev = self.env.event()
                self._waiting[inst.id] = ev
                yield ev
                continue
            self.env.process(self._execute(inst, batch, worker))

    def _execute(self, inst: Instance, batch: Batch, worker: simpy.Resource):
        """One batch on the instance's worker, in dispatch order: the worker's own per-batch cost
        (`overhead`) follows its compute; the driver round trip (`rpc`) is half in sending the batch
        and half in the result coming back. One batch at a time the worker waits out the round trip
        between batches; with async scheduling the next batch is already queued when one ends, unless it
        waited on that one (a prefill on its images, a first decode step on its prefill): then the worker
        waits out the round trip too, as the engine's batch records show (`run_result.turnaround`)."""
        half_rpc = self.lat.rpc / 2
        submitted = self.env.now
        prep_begin, prepared_at = self._prepare(inst, batch)
        if prepared_first(batch):  # its images are prepared before it joins the worker's queue: the driver learns so
            yield self.env.timeout(prepared_at - self.env.now + half_rpc)  # (then sends it, below)
            self.pipe.prepared(inst, batch)
            self._wake_all()
        with worker.request() as slot:
            yield self.env.timeout(half_rpc)  # sent: behind a running batch this is hidden, to an idle worker it is not
            yield slot
            result, busy_for = self._run_batch(batch, inst, prepared_at)
            if isinstance(result, EncodeResult) and any(not it.cached for it in batch.items):
                result.prep_begin = prep_begin  # the encode stage's service began with its images' host work
            self.batches.append(BatchRecord.of(inst.id, batch, submitted, result))
            yield self.env.timeout(busy_for + self.lat.overhead)
        yield self.env.timeout(half_rpc)
        self._sample_tokens(result)
        self.pipe.complete(inst, batch, result)
        self._wake_all()

    def _sample_tokens(self, result: Result) -> None:
        """The tokens a batch sampled, decided as it completes (when the request's output so far is known):
        EOS where the request's answer ends (`answer_tokens`), another token everywhere else."""
        if isinstance(result, MixedResult):
            self._sample_tokens(result.decode)
            self._sample_tokens(result.prefill)
        elif isinstance(result, DecodeResult):
            for rid in result.tokens:
                result.tokens[rid] = self._token(rid)
        elif isinstance(result, PrefillResult):
            for item in result.items:
                if item.first_token != -1:
                    item.first_token = self._token(item.request_id)

    def _token(self, rid: str) -> int:
        state = self.pipe.states.get(rid)
        if state is None:
            return self.token
        n = state.req.sampling.answer_tokens
        return self.eos if n is not None and len(state.output) + 1 >= n else self.token

    def _allocate(self):
        while not self._finished():
            self.allocation.tick(self.pipe, self.env.now)
            self._wake_all()  # a worker that started to drain may be able to switch at once
            yield self.env.timeout(self.allocation.interval_s)

    def _sample(self):
        while not self._finished():
            self.timeseries.extend(self.pipe.load_snapshot(self.env.now))
            yield self.env.timeout(self.sample_interval)

    # ---- one batch -------------------------------------------------------------------
    def _contention(self) -> float:
        """Workers sharing CPU cores slow each other: busy workers plus the driver over the cores."""
        cores = self.shared_cores
        if cores <= 0:
            return 1.0
        busy = sum(1 for i in self.pipe.instances.values() if i.busy)
        return max(1.0, (busy + 1) / cores)

    def _images(self, batch: EncodeBatch) -> tuple[list[tuple[float, int]], float]:
        """(source megapixels, tiles) per image the batch encodes (not the encoder cache's hits), and their
        native-resolution attention FLOPs."""
        m, images, attention = self.shape, [], 0.0
        for it in batch.items:
            if not it.cached:
                state = self.pipe.states[it.request_id]
                w, h = state.image_sizes[it.image_index]
                frames = len(getattr(state.media[it.image_index], "frames", ())) or 1  # a video segment: each frame decoded
                images.append((frames * w * h / 1e6, max(1, it.num_tokens // m.tokens_per_tile)))
                attention += m.image_attention_flops(it.num_tokens)
        return images, attention

    def _prepare(self, inst: Instance, batch: Batch) -> tuple[float, float]:
        """When an encode batch's host preparation is done. As on the engine's worker, the batch's images start
        on its host cores when the batch is sent (the batches before it may still be on the GPU), after the images
        of batches sent earlier; the batch joins the worker's queue once they are ready."""
        if not isinstance(batch, EncodeBatch):
            return self.env.now, self.env.now
        images, _ = self._images(batch)
        start = max(self.env.now, self._prep_free.get(inst.id, 0.0))
        self._prep_free[inst.id] = start + self.lat.preprocess(images, max(1, int(inst.cfg.num_cpus))) * self._contention()
        return start, self._prep_free[inst.id]

    def _run_batch(self, batch: Batch, inst: Instance, prepared_at: float) -> tuple[Result, float]:
        """Spans of one batch. A transfer costs `transfer(bytes)`, split between sender and receiver as the
        deployment's backend splits it (`send_share`). An encode batch first waits for what is left of its
        host preparation (`prepared_at`; none left by the time it runs)."""
        now, m, slow = self.env.now, self.shape, self._contention()
        if isinstance(batch, SwitchBatch):
            return SwitchResult((now, now + self.switch_cost_s), {}), self.switch_cost_s
        if isinstance(batch, EncodeBatch):
            sends = sum(self.lat.transfer(it.num_tokens * m.mm_bytes_per_token) * self.send_share for it in batch.items if it.send)
            images, attention = self._images(batch)
            tower = self.lat.encode(EncodeShape(sum(t for _, t in images), attention)) if images else 0.0
            wait = max(0.0, prepared_at - now)  # what is left of its images' host preparation
            d = wait + (tower + self.lat.device_prep(images)) * slow + sends
            items = [EncodedItem(it.request_id, it.image_index, SENT if it.send else None) for it in batch.items]
            return EncodeResult((now, now + d), items, host_wait=wait), d
        if isinstance(batch, PrefillBatch):
            t, spans = self._pulls(batch, now)
            d = self._prefill_time(batch, []) * slow
            return PrefillResult((t, t + d), self._prefilled(batch, spans)), t + d - now
        if isinstance(batch, MixedBatch):
            t, spans = self._kv_pulls(batch.decode, now)
            t, mm_spans = self._pulls(batch.prefill, t)
            states = [self.pipe.states[r] for r in batch.decode.step]
            d = self._prefill_time(batch.prefill, [s.prompt_len + len(s.output) + s.steps_inflight for s in states]) * slow
            decode = DecodeResult((t, t + d), {r: self.token for r in batch.decode.step}, spans)
            return MixedResult(decode, PrefillResult((t, t + d), self._prefilled(batch.prefill, mm_spans))), t + d - now
        assert isinstance(batch, DecodeBatch)
        t, spans = self._kv_pulls(batch, now)
        states = [self.pipe.states[r] for r in batch.step]
        context = sum(s.prompt_len + len(s.output) for s in states)
        d = self.lat.decode(DecodeShape(len(states), context)) * slow if states else 0.0
        return DecodeResult((t, t + d), {r: self.token for r in batch.step}, spans), t + d - now

    def _kv_pulls(self, batch: DecodeBatch, t: float) -> tuple[float, dict]:
        """New sequences' KV pulled one after another before the step: (when the step starts, their spans)."""
        spans = {}
        for new in batch.new:
            d = (
                self.lat.transfer(new.context_len * self.shape.kv_bytes_per_token + self.shape.state_bytes_per_seq) * (1 - self.send_share)
                if new.kv_handle is not None
                else 0.0
            )
            spans[new.request_id] = (t, t + d)
            t += d
        return t, spans

    def _pulls(self, batch: PrefillBatch, t: float) -> tuple[float, dict]:
        """Images pulled with a sequence's first chunk, one request after another."""
        spans = {}
        for it in batch.items:
            pulled = sum(mm.num_tokens for mm in it.images if mm.handle is not None)
            if pulled:
                d = self.lat.transfer(pulled * self.shape.mm_bytes_per_token) * (1 - self.send_share)
                spans[it.request_id] = (t, t + d)
                t += d
        return t, spans

    def _prefill_time(self, batch: PrefillBatch, decode_contexts: list[int]) -> float:
        """One forward over prefill chunks (each attending to its earlier chunks) and, in a mixed step,
        decode rows (one token attending to its context); the KV sends of finished prompts after it."""
        lens = tuple(len(it.prompt_ids) for it in batch.items) + (1,) * len(decode_contexts)
        starts = tuple(it.start for it in batch.items) + tuple(decode_contexts)
        sends = sum(
            self.lat.transfer(it.end * self.shape.kv_bytes_per_token + self.shape.state_bytes_per_seq) * self.send_share
            for it in batch.items
            if it.send_kv and it.final
        )
        return self.lat.prefill(PrefillShape(lens, starts)) + sends

    def _prefilled(self, batch: PrefillBatch, spans: dict) -> list[PrefilledItem]:
        return [
            PrefilledItem(
                it.request_id, self.token if it.final else -1, spans.get(it.request_id), SENT if it.send_kv and it.final else None
            )
            for it in batch.items
        ]
