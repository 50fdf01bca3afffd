"""A worker: one process (a Ray actor, or in-process) holding the model parts its roles need.

E: vision tower + projector and an MM cache. P: LM, KV cache, MM cache. D: LM, KV cache.
It runs the batches the driver sends and reports times on its own clock.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Optional

import torch

from epd.cache.paged import read_rows, write_rows_many
from epd.config import ModelConfig, PoolConfig, Role
from epd.distributed import CommSpec, PairRendezvous, join, leave
from epd.engine.gpu_decode import GpuJpegDecoder, is_jpeg, jpeg_bytes
from epd.engine.host_prep import ImageProcesses, prepare_image
from epd.engine.isolation import Failed, describe, isolated
from epd.engine.ordering import InOrder
from epd.images import ImageError
from epd.kernels.compilations import compiled_so_far
from epd.models.device_tokens import Fed, PendingTokens
from epd.models.generate import lm_step
from epd.models.image_processing import TorchOps, image_tensor
from epd.models.runtime import ModelRuntime
from epd.models.sampling import sample_full, sample_ids
from epd.request import INTERNAL, SamplingParams, TokenLogprob
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
    PrefillItem,
    PrefillResult,
    Result,
    SwitchBatch,
    SwitchResult,
)
from epd.transfer import Endpoint, TransferHandle, make_transfer
from epd.video import FrameStack, load_frames

PREPARE_TIMEOUT_S = 60.0  # `prepare` returns after this even if an image is still being prepared


@dataclass
class _Seq:
    blocks: list[int]
    context_len: int
    last_token: int
    generated: int
    sampling: SamplingParams
    prompt_ids: Optional[list[int]] = None  # kept only for penalties, which read the tokens so far
    output_ids: Optional[list[int]] = None
    rope: Any = None  # M-RoPE layout (Qwen2-VL families): rotary positions differ from cache positions
    pending: Optional[tuple[PendingTokens, int]] = None  # last_token is this row of a launched step, not on the host yet
    state_slot: Optional[int] = None  # a hybrid LM: its row of the worker's state pool


class _Landing:
    """A decode step launched on the device whose reply waits for its tokens to reach the host: `execute`
    lands it after handing the worker to the next batch."""

    def __init__(self, land):
        self.land = land


def assigned_gpu() -> Optional[int]:
    """The CUDA index of the GPU Ray gave this actor, in a process that sees all of the node's GPUs.

    Workers start with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES so that CUDA IPC can reach
    peers; Ray's GPU ids are then physical ids, mapped through any node-wide CUDA_VISIBLE_DEVICES.
    """
    import ray

    ids = ray.get_gpu_ids()
    if not ids:
        return None
    gid = str(ids[0])
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v != ""]
    return visible.index(gid) if visible and gid in visible else int(gid)


def _encode_key(batch: EncodeBatch) -> tuple:
    return tuple((it.request_id, it.image_index) for it in batch.items if not it.cached)


def _parts(roles: tuple[str, ...]) -> set[str]:
    """E needs the vision tower, P and D the language model."""
    return ({"vision"} if Role.ENCODE in roles else set()) | ({"lm"} if {Role.PREFILL, Role.DECODE} & set(roles) else set())


class Worker:
    def __init__(
        self,
        worker_id: str,
        roles: tuple[str, ...],
        model: ModelConfig,
        pool: PoolConfig,
        transfer: str,
        threads: int = 0,
        endpoint: Optional[Endpoint] = None,
        comm: Optional[CommSpec] = None,
        gpu: bool = False,
        prefetch: bool = False,  # the executor sends every encode batch to `prepare` before `execute`
        pairs: Optional[PairRendezvous] = None,  # push-based transfers: where their pair groups meet
    ):
        t0 = time.time()
        if threads > 0:
            torch.set_num_threads(threads)
        self.worker_id, self.roles, self.pool = worker_id, roles, pool
        self.endpoint = endpoint or Endpoint(worker_id)
        device = None
        if gpu:
            index = assigned_gpu()
            if index is not None:
                torch.cuda.set_device(index)
                device = f"cuda:{index}"
        self.comm = join(comm, comm.rank_of(self.endpoint.global_rank), torch.device(device) if device else None) if comm else None
        self.model_cfg = model
        t1 = time.time()
        self.rt = ModelRuntime(model, _parts(roles), device)
        t2 = time.time()
        self.transfer = make_transfer(transfer)
        self._configure(roles, pool)
        if pairs is not None:
            self.transfer.set_pairs(pairs)
        # Where a worker's time to ready goes (the record's workers.json): process group, weights, caches and graphs.
        self.startup_s = {"join": t1 - t0, "weights": t2 - t1, "caches_graphs": time.time() - t2}
        self.seqs: dict[str, _Seq] = {}
        self._tables_version = 0  # bumped when any sequence's block table changes: graph inputs are recopied
        self._batches_in_order = InOrder()  # batches run one at a time, in their tickets' order
        self._seq_lock = threading.Lock()  # a landing step and the next step's launch both update sequences
        self.device_fed = 0  # decode rows whose input token came from the step before on the device
        self._pushes_in_order = InOrder()  # per receiver
        # A batch's images are prepared on the worker's cores at once: in processes of their own where the batch
        # thread would take the interpreter lock from them (`host_prep`), else threads (videos and nvJPEG's bytes too).
        self._prep = ThreadPoolExecutor(max(1, threads), thread_name_prefix="preprocess")
        in_processes = pool.prep_processes if pool.prep_processes is not None else self.rt.device.type == "cuda"
        self._image_procs = ImageProcesses(model, max(1, threads)) if in_processes and Role.ENCODE in roles else None
        self.prefetch = prefetch
        self._prepared: dict[tuple, list[Future]] = {}  # encode batch -> its images' preparation, under way
        self._prepared_turn = threading.Condition()
        self._jpeg = GpuJpegDecoder.make(self.rt.device) if model.image_decode == "device" and self.rt.vision is not None else None

    def _configure(self, roles: tuple[str, ...], pool: PoolConfig) -> None:
        """Caches (and decode graphs) for `roles`; the model parts are already in place."""
        self.roles, self.pool = roles, pool
        self.graphs = self.step_graphs = None
        self.kv = self.state = None
        if self.rt.lm is not None:
            if self.endpoint.tp > 1 and self.rt.tp == 1:
                self.rt.shard_lm(self.endpoint.rank, self.endpoint.tp, self.comm.tp_group)
            # After sharding (this rank's share of each state); one slot past the driver's: decode graphs' padded rows.
            self.state = self.rt.allocate_state_pool(pool.state_slot_count + 1)
            # One block past the driver's pool: a scratch target for padded rows of CUDA-graph batches.
            self.kv = self.rt.allocate_kv_cache(pool.kv_blocks + 1, pool.kv_block_size)
            if self.rt.device.type == "cuda":
                self.rt.lm.fuse()
                # NCCL all-reduces are left out of graphs: tensor-parallel decode runs eagerly.
                graphed = self.model_cfg.cuda_graphs and self.state is None  # a hybrid LM's prefill steps run eagerly
                if self.model_cfg.cuda_graphs and Role.DECODE in roles and self.endpoint.tp == 1:
                    from epd.models.decode_graphs import DecodeGraphs

                    max_blocks = -(-self.rt.text_cfg.max_position_embeddings // pool.kv_block_size)
                    self.graphs = DecodeGraphs(self.rt.lm, self.kv, pool.kv_block_size, pool.kv_blocks, max_blocks, state=self.state)
                step_tokens = pool.max_prefill_tokens + (pool.max_decode_seqs if Role.DECODE in roles else 0)
                top = min(step_tokens, self.model_cfg.step_graph_tokens)
                if graphed and top > 0 and Role.PREFILL in roles and self.endpoint.tp == 1:
                    from epd.models.step_graphs import StepGraphs, bucket_sizes

                    self.step_graphs = StepGraphs(self.rt.lm, self.kv, pool.kv_block_size, pool.kv_blocks, bucket_sizes(top))
        self.rt.tower_graphs = None  # a switch's old graphs release their pool before new ones are captured
        if Role.ENCODE in roles and self.rt.device.type == "cuda" and self.model_cfg.cuda_graphs:
            # no larger than the biggest batch the scheduler can send
            most = pool.max_images_per_batch * self.rt.family.max_tiles_per_image
            self.rt.capture_tower_graphs(min(self.model_cfg.vision_graph_tiles, most))
        self.mm = self.rt.allocate_mm_cache(pool.mm_blocks, pool.mm_block_tokens) if {Role.ENCODE, Role.PREFILL} & set(roles) else None
        caches = (("mm", self.mm), ("kv", self.kv), ("state", self.state))
        self.transfer.bind(self.endpoint, {k: v for k, v in caches if v is not None})

    def _switch(self, batch: SwitchBatch) -> SwitchResult:
        """Leave this stage for another: the driver sends this only once nothing here is queued or held."""
        begin = time.time()
        self.seqs.clear()
        self.transfer.close()
        self.kv = self.mm = self.state = self.graphs = self.step_graphs = None  # the allocator reuses their memory for what comes next
        loaded = self.rt.set_parts(_parts(batch.roles))
        self._configure(batch.roles, batch.pool)
        self._sync()
        return SwitchResult((begin, time.time()), loaded)

    # ---- transfers between workers ---------------------------------------------------------
    def transfer_export(self) -> tuple[Endpoint, Any]:
        return self.endpoint, self.transfer.export()

    def transfer_connect(self, peers: dict[Endpoint, Any]) -> None:
        self.transfer.connect(peers)

    def push(self, handles: list[TransferHandle], receiver: str, ticket: int = 0) -> None:
        """Sender side of a push-based transfer (NCCL); runs on one of the actor's transfer threads.
        A receiver reads its batches' pulls in order, and with async scheduling two of its batches'
        pushes can be in flight at once: they go out in the order of their tickets."""
        with self._pushes_in_order.turn(receiver, ticket):
            self.transfer.push(handles, receiver)

    def close(self) -> None:
        self._prep.shutdown(wait=False)
        if self._image_procs is not None:
            self._image_procs.close()
        self.transfer.shutdown()
        if self.comm is not None:
            leave()

    def info(self) -> dict:
        weights = self.rt.weight_bytes()
        return {
            "worker": self.worker_id,
            "roles": list(self.roles),
            "device": str(self.rt.device),
            "vision_weight_bytes": weights["vision"],
            "lm_weight_bytes": weights["lm"],
            "kv_cache_bytes": 0 if self.kv is None else self.kv.numel() * self.kv.element_size(),
            "mm_cache_bytes": 0 if self.mm is None else self.mm.numel() * self.mm.element_size(),
            "state_cache_bytes": 0 if self.state is None else self.state.numel() * self.state.element_size(),
            "startup_s": {k: round(v, 3) for k, v in self.startup_s.items()},
            "image_prep": "processes" if self._image_procs is not None else "threads",
        }

    def ping(self) -> str:
        return self.worker_id

    def probe(self, fn, *args):
        """`fn(worker, *args)` here, between batches: benchmarks measure the worker's own steps."""
        return fn(self, *args)

    def prepare(self, batch: Batch, timeout_s: float = PREPARE_TIMEOUT_S) -> None:
        """A batch's host work — its images decoded and preprocessed on the prep threads, while the batches
        before it run — returning once it is done (or after `timeout_s`: `execute` then waits for what is
        left); `execute` takes it over. A Ray executor sends this on the actor's prep threads and sends
        `execute` once it has returned; the in-process executor calls it at submit."""
        if isinstance(batch, EncodeBatch):
            futures = self._start_preparing(batch)
            with self._prepared_turn:
                self._prepared[_encode_key(batch)] = futures
                self._prepared_turn.notify_all()
            wait_futures(futures, timeout=timeout_s)

    def _prepared_images(self, batch: EncodeBatch) -> list:
        key = _encode_key(batch)
        with self._prepared_turn:
            if self.prefetch:  # it was sent: wait for it rather than prepare the images twice
                self._prepared_turn.wait_for(lambda: key in self._prepared, timeout=60)
            futures = self._prepared.pop(key, None)
        if futures is None:
            futures = self._start_preparing(batch)
        return [f.result() for f in futures]

    def _start_preparing(self, batch: EncodeBatch) -> list[Future]:
        return [self._start_one(it) for it in batch.items if not it.cached]

    def _start_one(self, item) -> Future:
        procs = self._image_procs
        if procs is not None and not isinstance(item.image, FrameStack) and (self._jpeg is None or not is_jpeg(item.image)):
            return procs.submit(item.image)
        return self._prep.submit(self._timed_preprocess, item)

    def _timed_preprocess(self, item) -> tuple[float, torch.Tensor | bytes | str]:
        return time.time(), self._preprocess(item)

    def live_sequences(self) -> int:
        return len(self.seqs)

    def execute(self, batch: Batch, ticket: Optional[int] = None) -> Result:
        """Run one batch. A Ray actor takes a second `execute` while one runs, so the next batch is
        delivered and unpacked beside the running one; `ticket` (the batch's place in its instance's
        order) makes it start the moment the one before it ends."""
        if ticket is None:
            result, compiled = self._counted(batch)
        else:
            with self._batches_in_order.turn(None, ticket):
                if self.rt.device.type == "cuda":
                    torch.cuda.set_device(self.rt.device)  # the actor's threads each start on device 0
                result, compiled = self._counted(batch)
        # A launched decode step: the next batch may launch behind it while this one waits for its tokens.
        result = result.land() if isinstance(result, _Landing) else result
        if compiled > 0:
            (result.decode if isinstance(result, MixedResult) else result).compiled = compiled
        return result

    def _counted(self, batch: Batch) -> tuple[Result, int]:
        """The batch run, and the kernels compiled meanwhile (in its turn: one batch runs at a time)."""
        before = compiled_so_far()
        result = self._execute(batch)
        return result, compiled_so_far() - before

    def _execute(self, batch: Batch) -> Result:
        if isinstance(batch, EncodeBatch):
            return self._encode(batch)
        if isinstance(batch, PrefillBatch):
            return self._prefill(batch)
        if isinstance(batch, SwitchBatch):
            return self._switch(batch)
        if isinstance(batch, MixedBatch):
            return self._mixed(batch)
        return self._decode(batch)

    def _sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)

    # ---- E -----------------------------------------------------------------------------
    def _encode(self, batch: EncodeBatch) -> EncodeResult:
        begin = time.time()
        ok, results, pixels = [], [], []
        todo = [it for it in batch.items if not it.cached]
        timed = self._prepared_images(batch) if todo else []
        host_wait = time.time() - begin
        prep_begin = min((t for t, _ in timed), default=None)
        prepared = [px for _, px in timed]
        for item, px in zip(todo, prepared):
            if isinstance(px, str):
                results.append(EncodedItem(item.request_id, item.image_index, error=px))
            else:
                pixels.append(px)
                ok.append(item)
        embeddings = isolated(lambda idx: self._encode_images([pixels[i] for i in idx]), len(ok), f"{self.worker_id} encode")
        written = []
        for item, emb in zip(ok, embeddings):
            if isinstance(emb, Failed):
                results.append(EncodedItem(item.request_id, item.image_index, error=emb.reason, error_kind=INTERNAL))
            elif emb.shape[0] != item.num_tokens:
                why = f"image gave {emb.shape[0]} tokens, expected {item.num_tokens}"
                results.append(EncodedItem(item.request_id, item.image_index, error=why, error_kind=INTERNAL))
            else:
                written.append((item, emb))
        try:  # every image's rows in one copy (one index), not a copy and a host round trip per image
            write_rows_many(self.mm, [(item.mm_blocks, emb) for item, emb in written])
        except Exception as exc:
            why = describe(exc, f"{self.worker_id} encode")
            results.extend(EncodedItem(item.request_id, item.image_index, error=why, error_kind=INTERNAL) for item, _ in written)
            written = []
        for item, _ in written:
            try:
                handle = self.transfer.send("mm", item.mm_blocks, item.num_tokens) if item.send else None
            except Exception as exc:
                why = describe(exc, f"{self.worker_id} encode")
                results.append(EncodedItem(item.request_id, item.image_index, error=why, error_kind=INTERNAL))
                continue
            results.append(EncodedItem(item.request_id, item.image_index, handle=handle))
        for item in batch.items:  # encoder-cache hits, after the images they may share blocks with were written
            if item.cached:
                try:
                    handle = self.transfer.send("mm", item.mm_blocks, item.num_tokens) if item.send else None
                    results.append(EncodedItem(item.request_id, item.image_index, handle=handle))
                except Exception as exc:
                    why = describe(exc, f"{self.worker_id} encode")
                    results.append(EncodedItem(item.request_id, item.image_index, error=why, error_kind=INTERNAL))
        if ok:  # a batch of encoder-cache hits ran nothing: it must not wait for the decode steps queued on the device
            self._sync()
        return EncodeResult((begin, time.time()), results, host_wait, prep_begin)

    def _encode_images(self, pixels: list) -> list[torch.Tensor]:
        jpegs = [i for i, x in enumerate(pixels) if isinstance(x, bytes)]
        if jpegs:  # still encoded: decoded here, on the GPU, in one batch
            pixels = list(pixels)
            for i, x in zip(jpegs, self._jpeg.decode([pixels[i] for i in jpegs])):
                pixels[i] = x
        if self.model_cfg.image_resize == "device":
            pixels = [self._resized_on_device(x) for x in pixels]
        return self.rt.encode(pixels)

    def _resized_on_device(self, x):
        """One item's decoded pixels resized where they will be encoded (a video segment: its frames)."""
        if isinstance(x, list):
            return self.rt.family.preprocess_frames([f.to(self.rt.device, non_blocking=True) for f in x], TorchOps)
        return self.rt.family.preprocess(x.to(self.rt.device, non_blocking=True), TorchOps)

    def _preprocess(self, item) -> torch.Tensor | bytes | str:
        """What the tower's batch needs of one image, on the host: pixels resized (image_resize=host),
        decoded pixels (device), or a JPEG's bytes left for the GPU to decode (image_decode=device)."""
        try:
            if isinstance(item.image, FrameStack):  # a video segment: its frames, as one item
                frames = load_frames(item.image)
                if self.model_cfg.image_resize == "device":
                    return [image_tensor(f) for f in frames]
                return self.rt.family.preprocess_frames(frames)
            if self._jpeg is not None and (blob := jpeg_bytes(item.image)) is not None:
                return blob
            on_device = self.model_cfg.image_resize == "device"  # decoded here; resized on the device (`_encode`)
            pixels = prepare_image(item.image, self.rt.family, on_device)
            return pixels.pin_memory() if on_device and torch.cuda.is_available() else pixels  # the copy to the GPU is async
        except ImageError as exc:
            return str(exc)
        except Exception as exc:  # this image's failure, not the batch's
            return f"image could not be prepared: {describe(exc, f'{self.worker_id} preprocess')}"

    # ---- P -----------------------------------------------------------------------------
    def _prefill(self, batch: PrefillBatch) -> PrefillResult:
        self._release(batch.release)
        transfers, failed = self._pull_mm(batch.items)
        begin = time.time()
        items = [it for it in batch.items if it.request_id not in failed]
        rerun = self._rerunnable([], items)
        results = isolated(lambda idx: self._forward([], [items[i] for i in idx]), len(items), f"{self.worker_id} prefill", rerun)
        out = self._prefilled(items, results, transfers, failed)
        self._sync()
        return PrefillResult((begin, time.time()), out)

    def _pull_mm(self, items: list[PrefillItem]) -> tuple[dict, dict]:
        """The images prefill pulls (with a sequence's first chunk): all of a request's at once, one copy per sender."""
        transfers, failed = {}, {}
        for item in items:
            pulls = [(m.handle, m.blocks) for m in item.images if m.handle is not None]
            if pulls:
                t0 = time.time()
                try:
                    self.transfer.recv_many(pulls)
                    self._sync()
                except Exception as exc:
                    failed[item.request_id] = describe(exc, f"{self.worker_id} MM pull")
                    continue
                transfers[item.request_id] = (t0, time.time())
        return transfers, failed

    def _prefilled(self, items: list[PrefillItem], results: list, transfers: dict, failed: dict) -> list[PrefilledItem]:
        """Per chunk: the next token of a sequence whose last chunk this was (its KV sent, or the sequence
        kept for decode here); nothing yet for an earlier chunk."""
        out = [PrefilledItem(rid, -1, error=why) for rid, why in failed.items()]
        for it, first in zip(items, results):
            done = PrefilledItem(it.request_id, -1, mm_transfer=transfers.get(it.request_id))
            out.append(done)
            if isinstance(first, Failed):
                done.error = first.reason
                continue
            if not it.final:
                continue
            done.first_token, done.logprob = first
            total = it.end
            try:
                if it.send_kv:
                    done.kv_handle = self.transfer.send("kv", it.kv_blocks, total)
                    if self.state is not None:  # the linear layers' state goes with the KV
                        done.kv_handle.state = self.transfer.send("state", [it.state_slot], 1)
            except Exception as exc:
                done.error = describe(exc, f"{self.worker_id} prefill")
                continue
            if it.keep_for_decode:
                outputs = it.generated + [done.first_token]
                history = it.sampling.needs_history
                self._tables_version += 1
                self.seqs[it.request_id] = _Seq(
                    list(it.kv_blocks),
                    total,
                    done.first_token,
                    len(outputs),
                    it.sampling,
                    it.prompt if history else None,
                    outputs if history else None,
                    it.rope,
                    state_slot=it.state_slot,
                )
        return out

    def _chunk_rows(self, it: PrefillItem) -> Optional[torch.Tensor]:
        """The image-embedding rows of a chunk's placeholders (its share of the sequence's images)."""
        if not it.images:
            return None
        limit = len(it.prompt_ids) if it.prompt_end is None else max(0, it.prompt_end - it.start)
        n = it.prompt_ids[:limit].count(self.rt.family.image_token_id)
        if n == 0:
            return None
        parts, at = [], 0  # only the images (and rows) this chunk covers are read
        for m in it.images:
            lo, hi = max(it.mm_offset - at, 0), min(it.mm_offset + n - at, m.num_tokens)
            if lo < hi:
                parts.append(read_rows(self.mm, m.blocks, hi)[lo:])
            at += m.num_tokens
        return torch.cat(parts)

    def _forward(self, rids: list[str], chunks: list[PrefillItem]) -> list[Optional[tuple[int, Optional[TokenLogprob]]]]:
        """One forward over decode steps of `rids` and prefill `chunks` (each writes its KV): per entry the
        sampled token and logprob; None for a chunk that is not its sequence's last."""
        if not chunks:
            return self._decode_compute(rids)
        seqs = self._settled(rids)
        logits = lm_step(
            self.rt,
            self.kv,
            [[s.last_token] for s in seqs] + [it.prompt_ids for it in chunks],
            [s.context_len for s in seqs] + [it.start for it in chunks],
            [s.blocks for s in seqs] + [it.kv_blocks for it in chunks],
            self.pool.kv_block_size,
            [None] * len(seqs) + [self._chunk_rows(it) for it in chunks],
            [0] * len(seqs) + [it.prompt_end if it.prompt_end is not None else it.end for it in chunks],
            graphs=self.step_graphs,
            rope=[s.rope for s in seqs] + [it.rope for it in chunks],
            states=self._states([s.state_slot for s in seqs] + [it.state_slot for it in chunks]),
        )
        finals = [it for it in chunks if it.final]
        rows = list(range(len(seqs))) + [len(seqs) + j for j, it in enumerate(chunks) if it.final]
        if not rows:
            return [None] * len(chunks)
        sampled = sample_full(
            logits[rows] if len(rows) < logits.shape[0] else logits,
            [s.sampling for s in seqs] + [it.sampling for it in finals],
            [s.generated for s in seqs] + [len(it.generated) for it in finals],
            prompts=[s.prompt_ids for s in seqs] + [it.prompt for it in finals],
            outputs=[s.output_ids for s in seqs] + [it.generated for it in finals],
            eos_token_id=self.rt.text_cfg.eos_token_id,
        )
        picked = iter(zip(sampled.tokens, sampled.logprobs))
        out: list = [next(picked) for _ in seqs]
        return out + [next(picked) if it.final else None for it in chunks]

    # ---- D -----------------------------------------------------------------------------
    def _admit(self, batch: DecodeBatch) -> tuple[dict, dict]:
        """Sequences new to this worker (their KV pulled from prefill), then the blocks running ones grew by."""
        transfers, errors = {}, {}
        for new in batch.new:
            t0 = time.time()
            if new.kv_handle is not None:
                try:
                    self.transfer.recv(new.kv_handle, new.kv_blocks)
                    if new.kv_handle.state is not None:
                        self.transfer.recv(new.kv_handle.state, [new.state_slot])
                    self._sync()
                except Exception as exc:
                    errors[new.request_id] = describe(exc, f"{self.worker_id} KV pull")
                    continue
            transfers[new.request_id] = (t0, time.time())
            outputs = new.output_ids or [new.last_token]
            history = new.sampling.needs_history
            self.seqs[new.request_id] = _Seq(
                list(new.kv_blocks),
                new.context_len,
                new.last_token,
                len(outputs),
                new.sampling,
                new.prompt_ids,
                list(outputs) if history else None,
                new.rope,
                state_slot=new.state_slot,
            )
        for rid, blocks in batch.grow.items():
            if rid in self.seqs:
                self.seqs[rid].blocks = self.seqs[rid].blocks + blocks
        if batch.new or batch.grow:
            self._tables_version += 1
        for rid in batch.step:  # e.g. failed in the step before, which the driver had not seen when it sent this one
            if rid not in self.seqs and rid not in errors:
                errors[rid] = f"{self.worker_id} holds no sequence {rid!r}"
        return transfers, errors

    def _stepped(self, step: list[str], results: list, errors: dict) -> tuple[dict, dict]:
        tokens, logprobs = {}, {}
        for rid, res in zip(step, results):
            if isinstance(res, Failed):
                errors[rid] = res.reason
                self.seqs.pop(rid, None)  # the driver aborts it
                continue
            tok, logprob = res
            s = self.seqs[rid]
            s.context_len += 1
            s.last_token = tok
            s.generated += 1
            if s.output_ids is not None:
                s.output_ids.append(tok)
            tokens[rid] = tok
            if logprob is not None:
                logprobs[rid] = logprob
        return tokens, logprobs

    def _decode(self, batch: DecodeBatch) -> DecodeResult | _Landing:
        self._release(batch.release)
        transfers, errors = self._admit(batch)
        begin = time.time()
        step = [rid for rid in batch.step if rid not in errors]
        if step and all(self._feeds_forward(self.seqs[r].sampling) for r in step):
            rerun = self._rerunnable(step, [])
            launched = isolated(lambda idx: self._launch([step[i] for i in idx]), len(step), f"{self.worker_id} decode", rerun)
            return _Landing(lambda: self._landed(step, launched, begin, transfers, errors))
        rerun = self._rerunnable(step, [])
        sampled = isolated(lambda idx: self._decode_compute([step[i] for i in idx]), len(step), f"{self.worker_id} decode", rerun)
        tokens, logprobs = self._stepped(step, sampled, errors)
        return DecodeResult((begin, time.time()), tokens, transfers, logprobs, errors)

    @staticmethod
    def _feeds_forward(sampling: SamplingParams) -> bool:
        """A sequence whose next step needs nothing of this one on the host (no penalties over its tokens,
        no logprobs) steps from its sampled id on the device."""
        return not sampling.needs_history and sampling.logprobs is None

    def _launch(self, rids: list[str]) -> list[tuple[PendingTokens, int]]:
        """Queue one decode step of `rids` on the device, its input ids taken from the steps before it where
        those have not reached the host; the sequences advance at once (the step's tokens land later)."""
        seqs = [self.seqs[r] for r in rids]
        with self._seq_lock:
            fed = self._fed(seqs)
        tokens = PendingTokens(sample_ids(*self._decode_sampling_inputs(seqs, self._decode_logits(rids, seqs, fed))))
        held = [(tokens, row) for row in range(len(seqs))]
        with self._seq_lock:
            for s, h in zip(seqs, held):
                s.context_len += 1
                s.generated += 1
                s.pending = h
        self.device_fed += sum(len(rows) for _, rows, _ in fed)
        return held

    def _landed(self, step: list[str], launched: list, begin: float, transfers: dict, errors: dict) -> DecodeResult:
        """A launched step's reply, once its tokens are on the host."""
        tokens: dict[str, int] = {}
        for rid, res in zip(step, launched):
            if isinstance(res, Failed):
                errors[rid] = res.reason
                self.seqs.pop(rid, None)  # the driver aborts it
                continue
            try:
                tokens[rid] = self._land(self.seqs.get(rid), res)
            except Exception as exc:  # an asynchronous device error shows here
                errors[rid] = describe(exc, f"{self.worker_id} decode")
                self.seqs.pop(rid, None)
        return DecodeResult((begin, time.time()), tokens, transfers, {}, errors)

    @staticmethod
    def _fed(seqs: list[_Seq]) -> Fed:
        """Rows whose last token is still only on the device, grouped by the step that sampled them."""
        groups: dict[int, tuple] = {}
        for i, s in enumerate(seqs):
            if s.pending is not None:
                pending, row = s.pending
                group = groups.setdefault(id(pending), (pending.device, [], []))
                group[1].append(i)
                group[2].append(row)
        return list(groups.values())

    def _settled(self, rids: list[str]) -> list[_Seq]:
        """The sequences of `rids` with their last tokens on the host (waiting for launched steps to land)."""
        seqs = [self.seqs[r] for r in rids]
        for s in seqs:
            held = s.pending  # read once: a landing step may clear it meanwhile
            if held is not None:
                self._land(s, held)
        return seqs

    def _land(self, s: Optional[_Seq], held: tuple[PendingTokens, int]) -> int:
        """The token `held` names, on the host; it becomes `s`'s last token unless a later step of `s` was
        launched meanwhile (or `s` is gone)."""
        pending, row = held
        tok = pending.values()[row]
        with self._seq_lock:
            if s is not None and s.pending is held:
                s.last_token, s.pending = tok, None
        return tok

    def _mixed(self, batch: MixedBatch) -> MixedResult:
        """Running decodes and prefill chunks in one forward: the chunks ride on the decode step."""
        self._release(batch.decode.release + batch.prefill.release)
        transfers, errors = self._admit(batch.decode)
        mm_transfers, failed = self._pull_mm(batch.prefill.items)
        begin = time.time()
        step = [rid for rid in batch.decode.step if rid not in errors]
        items = [it for it in batch.prefill.items if it.request_id not in failed]
        n = len(step)
        results = isolated(
            lambda idx: self._forward([step[i] for i in idx if i < n], [items[i - n] for i in idx if i >= n]),
            n + len(items),
            f"{self.worker_id} step",
            self._rerunnable(step, items),
        )
        tokens, logprobs = self._stepped(step, results[:n], errors)
        prefilled = self._prefilled(items, results[n:], mm_transfers, failed)
        self._sync()
        span = (begin, time.time())
        return MixedResult(DecodeResult(span, tokens, transfers, logprobs, errors), PrefillResult(span, prefilled))

    def _decode_compute(self, rids: list[str]) -> list[tuple[int, Optional[TokenLogprob]]]:
        """One step of the sequences `rids`, waited for: writes each one's next KV position, samples its
        next token (the path of sequences whose sampling reads their tokens on the host)."""
        seqs = self._settled(rids)
        sampled = sample_full(*self._decode_sampling_inputs(seqs, self._decode_logits(rids, seqs)))
        return list(zip(sampled.tokens, sampled.logprobs))

    def _decode_logits(self, rids: list[str], seqs: list[_Seq], fed: Optional[Fed] = None) -> torch.Tensor:
        tables = [s.blocks for s in seqs]
        if self.graphs is not None and self.graphs.fits(len(seqs), tables):
            shift = [s.rope.delta if s.rope is not None else 0 for s in seqs] if any(s.rope is not None for s in seqs) else None
            key = (tuple(rids), self._tables_version)
            slots = [s.state_slot for s in seqs] if self.state is not None else None
            return self.graphs.run(
                [s.last_token for s in seqs], [s.context_len for s in seqs], tables, key=key, rope_shift=shift, fed=fed, state_slots=slots
            )
        return lm_step(
            self.rt,
            self.kv,
            [[s.last_token] for s in seqs],
            [s.context_len for s in seqs],
            tables,
            self.pool.kv_block_size,
            rope=[s.rope for s in seqs],
            fed=fed,
            states=self._states([s.state_slot for s in seqs]),
        )

    def _rerunnable(self, step: list[str], items: list[PrefillItem]) -> Optional[list[bool]]:
        """Which of a batch's decodes and chunks may run again alone after the batch raised: all, except with a
        hybrid LM the ones that continue a state (decodes, later chunks) the failed batch may have advanced."""
        if self.state is None:
            return None
        return [False] * len(step) + [it.start == 0 for it in items]

    def _states(self, slots: list[Optional[int]]) -> Optional[tuple[torch.Tensor, list[int]]]:
        """A hybrid LM's state pool and the step's slots in it (None for other LMs)."""
        if self.state is None:
            return None
        if None in slots:
            raise RuntimeError(f"{self.worker_id}: a sequence of this step has no state slot")
        return self.state, slots

    def _decode_sampling_inputs(self, seqs: list[_Seq], logits: torch.Tensor) -> tuple:
        return (
            logits,
            [s.sampling for s in seqs],
            [s.generated for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids for s in seqs],
            self.rt.text_cfg.eos_token_id,
        )

    def _release(self, ids: list[str]) -> None:
        for rid in ids:
            self.seqs.pop(rid, None)
        if ids:
            self._tables_version += 1  # a released id may come back (recomputed) with other blocks

    def release(self, ids: list[str]) -> int:
        """Forget finished sequences; returns how many the worker still holds."""
        self._release(ids)
        return len(self.seqs)
