"""Batched decoding with continuous batching over a static pool of sequence rows.

    model, tokenizer, info = load_model("smollm2-135m")
    engine = Engine(model, tokenizer, make_policy("adore"), info=info, max_batch=8, max_seq_len=4096)
    rid = engine.add_request("Once upon a time", SamplingParams(max_tokens=64))
    while engine.has_work():
        for out in engine.step():          # StepOutput: request_id, token_id, text, finished, ...
            print(out.text, end="")

Each `step()` first prefills, then runs one decode step for every active row at once.

Prefill: waiting requests take free rows in arrival order, and up to `max_prefill_tokens` of their
prompt tokens go through ONE packed forward (`attention.forward_prompts`: the prompts end to end as
one sequence, each token at its own position attending only to its own prompt, causally; dense, or
top-K when the model was fine-tuned under top-K attention). A prompt longer than the room left is
cut into chunks over the next steps: its earlier chunks' K/V (every layer, every position) and the
attention mass they received wait in the request's staging (`attention.PromptKV`), and its later
chunks attend to them. When a prompt's last chunk is in, the policy cuts it to its budget m (from
the same scores and mass as a one-forward prefill of that prompt) into the request's cache row, and
its last hidden state gives the first token; a request whose prompt is still being chunked in holds
its row but does not decode yet, while the running rows decode every step.

A decode step per row:

  1. the policy scores every past position (adore: by the attention the previous tokens gave them,
     or by the paper's controller, which reads the current token);
  2. recompute-rebuild: the best released tokens are chosen to run again (up to R);
  3. the rows (rebuilt tokens + the current one) get free slots and run through every layer,
     attending to the slots at or before their positions, top-K per head; the policy observes the
     step (adore: the current token's attention to every cached and stored token);
  4. stored-rebuild: released tokens that now outscore cached ones are copied back from the
     cache's second tier; the cache is cut back to the budget m by the policy's scores (one
     decision for all layers; released tokens go to the second tier);
  5. the current row's logits give the next token.

All decisions are made from tensors every tensor-parallel rank holds identically, so ranks that run
the same calls stay in lock-step (workers/ relies on this).

On a GPU a decode step makes the host wait for the device once, when its tokens (and the step's
counts, which ride along) come over: the policy's choices are fixed-shape tensor ops (padding sent to
trash slots), host values go over in pinned copies, and the bounds the host needs come from its own
counts or the previous step's (tests/test_step_syncs.py).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field, replace

import torch
from torch.profiler import record_function

from .attention import PromptKV, decoder_parts, forward_prompts, forward_slots, head_dim, local_kv_heads
from .cache import SlotCache
from .config import SamplingParams, UserError, prefill_tokens_for
from .models import ModelInfo
from .policies import Policy, SlotView, select_keep
from .policies.base import nothing_rebuilt
from .sampling import Detokenizer, draw_uniforms, make_generator, sample_tokens


@dataclass
class StepOutput:
    request_id: str
    token_id: int | None  # None when a request ends without a new token (stop string, abort)
    text: str  # new text since the previous output of this request
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logprob: float | None = None
    error: str | None = None  # finish_reason "error": what failed (the other requests go on)


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float]
    top1: list[bool]  # per token: was it the model's most likely one (forced: did greedy agree)


@dataclass
class _Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    detok: Detokenizer
    gen: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    next_pos: int = 0  # position of the pending token
    finish_reason: str | None = None
    kv: PromptKV | None = None  # staging while its prompt is being prefilled (possibly over steps)


class Engine:
    def __init__(self, model, tokenizer, policy: Policy, *, info: ModelInfo | None = None, max_batch: int = 8,
                 max_seq_len: int = 4096, max_prefill_tokens: int | None = None,
                 cuda_graphs: bool | None = None, pack_rows: bool = True) -> None:
        """info: the model's ModelInfo from adore.models.load_model (or apply_adapter), which picks
        the default controller and the prefill's attention; None: a model of no known name without
        an adapter (a fresh controller, dense prefill)."""
        self.device = next(model.parameters()).device
        max_prefill_tokens = prefill_tokens_for(self.device, max_prefill_tokens)  # None: by device
        if max_batch < 1 or max_seq_len < 2 or max_prefill_tokens < 1:
            raise UserError("max_batch >= 1, max_seq_len >= 2 and max_prefill_tokens >= 1 are required")
        info = info if info is not None else ModelInfo()
        if info.tuned_top_k is not None and "top_k" in policy.knobs and policy.cfg.top_k is None:
            # top-K is off by default, except on a model whose adapter was trained under it
            policy.cfg = replace(policy.cfg, top_k=info.tuned_top_k)
        self.model, self.tok, self.policy, self.info = model, tokenizer, policy, info
        self.pack_rows = pack_rows  # eager steps run linears on live rows only (attention.forward_slots)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens per step, in one packed forward
        cfg = model.config
        self.embed, _, _, self.lm_head, _ = decoder_parts(model)
        self.vocab_size = cfg.vocab_size
        policy.bind(model, info, self.embed, self.device)  # a learned policy loads its scorer here
        self.controller = getattr(policy, "controller", None)  # for reports (bench/quality.py)
        feat_dim, ctrl_dim = policy.state_dims()
        # AutoTP shards heads across ranks: take local head counts from the (sharded) weights.
        self.cache = SlotCache(
            layers=cfg.num_hidden_layers, batch=max_batch, kv_heads=local_kv_heads(model),
            head_dim=head_dim(cfg),
            capacity=policy.capacity(max_seq_len), max_positions=max_seq_len,
            feat_dim=feat_dim, ctrl_dim=ctrl_dim, store_size=policy.store_size,
            dtype=next(model.parameters()).dtype, device=self.device)
        self.cache.store_bound = 0  # the stores start empty; each step and placement keeps the bound
        # the current token's queries of every layer [L, B, Hq, D], for a policy that scores by them
        self.queries = None
        if policy.needs_queries:
            hd = head_dim(cfg)
            hq = model.model.layers[0].self_attn.q_proj.weight.shape[0] // hd  # local heads (AutoTP)
            self.queries = torch.zeros(cfg.num_hidden_layers, max_batch, hq, hd, device=self.device,
                                       dtype=next(model.parameters()).dtype)
        # Static decode steps replayed from CUDA graphs (None: on when the model is on one GPU; off
        # under tensor parallelism until its captured all-reduces are measured on two GPUs; True
        # captures them: every rank captures the same shapes in the same step, as all decide alike).
        self.graphed = None
        if cuda_graphs is None:
            dist = torch.distributed
            tp = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            cuda_graphs = self.device.type == "cuda" and not tp
        if cuda_graphs:
            from .cuda_graph import GraphedDecoder

            self.graphed = GraphedDecoder(model, self.cache, policy.top_k, policy.needs_mass, self.queries)
        # A model fine-tuned under top-K attention (an `adore finetune` adapter) saw top-K in every
        # position in training, so its prompt is read under top-K too: a dense prefill would feed
        # the decode KV states the adapter never produced in training.
        self.prefill_top_k = policy.top_k if info.tuned_top_k is not None else None
        self.requests: dict[str, _Request] = {}
        self.waiting: deque[str] = deque()
        self.rows: list[str] = []  # request id of each active row, rows packed at [0, n)
        self._ids = itertools.count()
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self.trace: list[dict] | None = None  # set to [] to record each step's decisions (tests)
        self.stats = {"steps": 0, "released": 0, "rebuilt": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "peak_cache_tokens": 0, "peak_step_tokens": 0, "stored_tokens": 0}

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; it joins the running batch at the next step with a free row."""
        params = params or SamplingParams()
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise UserError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise UserError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise UserError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                            f"engine's max_seq_len ({self.max_seq_len})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise UserError(f"request id {rid!r} is already in use")
        gen = make_generator(params.seed, self.device) if params.temperature > 0 else None
        self.requests[rid] = _Request(rid, ids, params, Detokenizer(self.tok, params.stop), gen)
        self.waiting.append(rid)
        return rid

    def abort(self, rid: str) -> bool:
        """Drop a request now (waiting or running); its row is free for the next step."""
        req = self.requests.pop(rid, None)
        if req is None:
            return False
        if rid in self.waiting:
            self.waiting.remove(rid)
        elif rid in self.rows:
            self._free_rows([self.rows.index(rid)])
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.rows)

    @property
    def n_active(self) -> int:
        return len(self.rows)

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Prefill (at most max_prefill_tokens prompt tokens, in one packed forward), then one decode
        step for every active row.

        A request whose prefill fails ends with finish_reason "error" and the step goes on; a failing
        decode ends the rows of that step the same way (their cache rows are freed), so one bad
        request never takes the engine, or a server built on it, down."""
        outs: list[StepOutput] = []
        if self.waiting:
            self._prefill(outs)
        if self.rows:
            reqs = [self.requests[r] for r in self.rows]
            n_out = len(outs)
            try:
                self._decode(outs)
            except Exception as e:  # noqa: BLE001
                del outs[n_out:]
                self._fail(reqs, e, outs)
        return outs

    def _fail(self, reqs: list[_Request], exc: Exception, outs: list[StepOutput]) -> None:
        msg = f"{type(exc).__name__}: {exc}"[:500]
        rows = [self.rows.index(r.rid) for r in reqs if r.rid in self.rows]
        self._free_rows(rows)
        for r in reqs:
            if r.rid in self.waiting:  # failed while its prompt was being prefilled
                self.waiting.remove(r.rid)
            r.kv = None
            r.finish_reason = "error"
            outs.append(StepOutput(r.rid, None, "", True, "error", error=msg))

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill(self, outs: list[StepOutput]) -> None:
        """This step's prompt chunks in one packed forward; each request whose last chunk is in takes
        its row and gets its first token. If the packed forward fails, each chunk runs alone, so that
        only the request that fails ends (with "error")."""
        with record_function("adore.prefill.plan"):  # labels for a profile (bench/gpu_latency.py --profile)
            plan = self._plan_prefill(outs)
        if not plan:
            return
        try:
            with record_function("adore.prefill.forward"):
                done = self._forward_chunks(plan)
        except Exception as e:  # noqa: BLE001 - reported to the request that fails, the engine lives on
            if len(plan) == 1:
                self._fail([plan[0][0]], e, outs)
                return
            done = []
            for chunk in plan:
                try:
                    done += self._forward_chunks([chunk])
                except Exception as e1:  # noqa: BLE001
                    self._fail([chunk[0]], e1, outs)
        finished = {req.rid for req, _ in done}
        self.waiting = deque(r for r in self.waiting if r not in finished)
        placed, hidden = self._place_all(done, outs)
        if placed:
            n_out = len(outs)
            try:  # [n, 1, H] -> [n, V]: 3-D in, as DeepSpeed's sharded head slices [B, S, H]
                self._next_tokens(placed, self.lm_head(torch.stack(hidden))[:, 0], outs)
            except Exception as e:  # noqa: BLE001
                del outs[n_out:]
                self._fail(placed, e, outs)

    def _plan_prefill(self, outs: list[StepOutput]) -> list[tuple[_Request, int]]:
        """This step's chunks, (request, prompt tokens), at most max_prefill_tokens in all: the waiting
        requests in order, each as far as the room allows, while rows are free. A request keeps the
        row it took while its prompt is chunked in; as the prompt cut short is the last one a step
        takes, it is first in the next step's plan."""
        plan, room, rows = [], self.max_prefill_tokens, len(self.rows)
        for rid in list(self.waiting):
            if room == 0 or rows == self.max_batch:
                break
            req = self.requests[rid]
            if req.params.max_tokens == 0:
                self.waiting.remove(rid)
                self._finish(req, "length", outs)
                continue
            if req.kv is None:
                try:
                    ids = torch.tensor(req.prompt, device=self.device)
                    req.kv = PromptKV.new(ids, want_mass=self.policy.needs_mass,
                                          want_queries=self.policy.needs_queries)
                except Exception as e:  # noqa: BLE001 - e.g. no device memory left for its ids
                    self._fail([req], e, outs)
                    continue
            n = min(len(req.prompt) - req.kv.done, room)
            plan.append((req, n))
            room -= n
            rows += 1
        return plan

    def _forward_chunks(self, plan: list[tuple[_Request, int]]) -> list[tuple[_Request, torch.Tensor]]:
        """One packed forward of plan's chunks: (request, last hidden state [1, H]) for each request
        whose whole prompt is now in."""
        hidden = forward_prompts(self.model, [(r.kv, n) for r, n in plan], top_k=self.prefill_top_k)
        self.stats["prefill_tokens"] += sum(n for _, n in plan)
        ends = itertools.accumulate(n for _, n in plan)
        return [(r, hidden[:, e - 1]) for (r, _), e in zip(plan, ends) if r.kv.done == len(r.prompt)]

    def _place_all(self, done: list[tuple[_Request, torch.Tensor]], outs: list[StepOutput]
                   ) -> tuple[list[_Request], list[torch.Tensor]]:
        """The requests whose whole prompt is in take the next rows: (request, last hidden state) each ->
        those placed and their hidden states. Prompts within the budget go in together (`_place_whole`:
        a handful of batched ops, however many there are: a burst's placement is not per-request host
        work); longer ones are cut one by one (`_place_cut`). If the batched placement fails, each
        request is placed alone, so that only one that fails ends (with "error")."""
        budget = self.policy.budget

        def fits(req: _Request) -> bool:
            return budget is None or len(req.prompt) <= budget

        whole = [(r, h) for r, h in done if fits(r)]
        placed, hidden, alone = [], [], done
        if len(whole) > 1:
            n0 = len(self.rows)
            try:
                with record_function("adore.prefill.place"):
                    self._place_whole([r for r, _ in whole])
            except Exception:  # noqa: BLE001 - undone, then each one alone below
                del self.rows[n0:]
                self.cache.clear(slice(n0, self.max_batch))
            else:
                placed, hidden = [r for r, _ in whole], [h for _, h in whole]
                alone = [(r, h) for r, h in done if not fits(r)]
        for req, h in alone:
            try:
                with record_function("adore.prefill.place"):
                    if fits(req):
                        self._place_whole([req])
                    else:
                        self._place_cut(req)
            except Exception as e:  # noqa: BLE001 - that request ends, the others go on
                self._fail([req], e, outs)
                continue
            placed.append(req)
            hidden.append(h)
        return placed, hidden

    def _place_whole(self, reqs: list[_Request]) -> None:
        """Prompts no longer than the budget take the next rows [n0, n0 + k) whole: every position in
        the slot of its own number (slot j = position j), in one copy for all of them; then the policy
        scores them (one call: its features start from their prompts)."""
        c, pol, dev = self.cache, self.policy, self.device
        n0, k = len(self.rows), len(reqs)
        rows = slice(n0, n0 + k)
        lengths = [len(r.prompt) for r in reqs]
        P = max(lengths)
        self.rows += [r.rid for r in reqs]
        c.clear(rows)
        # every prompt token j of row b: (b, j), built on the host and sent once
        at_row = torch.repeat_interleave(torch.arange(n0, n0 + k), torch.tensor(lengths)).to(dev)
        at_pos = torch.cat([torch.arange(n) for n in lengths]).to(dev)
        kvs = [r.kv for r in reqs]
        c.tok_at[at_row, at_pos] = torch.cat([kv.ids for kv in kvs])
        src = torch.arange(at_pos.numel(), device=dev)
        c.put(torch.cat([kv.k for kv in kvs], 2)[:, None], torch.cat([kv.v for kv in kvs], 2)[:, None],
              torch.zeros_like(src), src, at_row, at_pos, at_pos)
        if kvs[0].mass is not None:
            c.mass[at_row, at_pos] = torch.cat([kv.mass for kv in kvs])
        queries = torch.cat([kv.q_last for kv in kvs], 1) if kvs[0].q_last is not None else None
        pol.prefill_scores(c, rows, lengths, queries, c.k[:, rows, :, :P])
        for r in reqs:
            r.kv, r.next_pos = None, len(r.prompt)
        self.stats["peak_cache_tokens"] = max(self.stats["peak_cache_tokens"], P)

    def _place_cut(self, req: _Request) -> None:
        """A prompt longer than the budget takes the next row: the policy cuts it to the budget, one
        decision for all layers as after a decode step (the released positions go to the second tier,
        best first), with no device sync."""
        c, pol, dev = self.cache, self.policy, self.device
        kv, row, P, m = req.kv, len(self.rows), len(req.prompt), pol.budget
        self.rows.append(req.rid)
        c.clear(row)
        c.tok_at[row, :P] = kv.ids
        src_k, src_v = kv.k[:, None], kv.v[:, None]  # [L, 1, Hkv, P, D]
        pos_scores = pol.prefill_scores(c, slice(row, row + 1), [P], kv.q_last, src_k)  # [1, P] or None
        pos = torch.arange(P, device=dev)
        mass = kv.mass[None] if kv.mass is not None else torch.zeros(1, P, device=dev)
        keep = select_keep(pol, SlotView(pos[None], pos[-1:], mass, pos_scores),
                           torch.ones(1, P, dtype=torch.bool, device=dev))[0]  # exactly m True
        # the kept positions first (in order), then the released ones best first
        s = pos_scores[0] if pos_scores is not None else torch.zeros(P, device=dev)
        order = s.argsort(descending=True, stable=True)
        order = order[keep[order].int().argsort(descending=True, stable=True)]
        kept, out = order[:m].sort().values, order[m:]
        c.released[row, :P] = True
        c.released[row, kept] = False
        self.stats["released"] += P - m
        if c.store_k is not None:  # the second tier keeps the released prompt tokens' K/V
            out = out[: c.store_size]
            c.store_from(src_k, src_v, torch.zeros_like(out), out, torch.full_like(out, row), out, None)
            c.store_bound = max(c.store_bound, out.numel())  # its store fills slots [0, len(out)) at most
        c.put(src_k, src_v, torch.zeros_like(kept), kept, torch.full_like(kept, row),
              torch.arange(m, device=dev), kept)
        if kv.mass is not None:
            c.mass[row, :m] = kv.mass[kept]
        req.kv, req.next_pos = None, P
        self.stats["peak_cache_tokens"] = max(self.stats["peak_cache_tokens"], m)

    def _decode(self, outs: list[StepOutput]) -> None:
        c, pol = self.cache, self.policy
        n = len(self.rows)
        reqs = [self.requests[r] for r in self.rows]
        dev = self.device
        ar = torch.arange(n, device=dev)
        cur_tok, cur_pos = self._to_device([[r.out[-1] for r in reqs], [r.next_pos for r in reqs]])
        c.tok_at[ar, cur_pos] = cur_tok
        c.pos_bound = max(r.next_pos for r in reqs) + 1

        # 1-2. the policy's scores for every position (adore: the controller), and its rebuild choice
        # (recomputed rebuilds run as query rows beside the current token; stored ones come back
        # after the layers, step 4)
        stored = pol.rebuild_source == "stored"
        with record_function("adore.policy.scores"):  # labels for bench/profile_step.py's cost table
            pos_scores = pol.step_scores(c, n, cur_tok, cur_pos)
            rb_pos, rb_ok = nothing_rebuilt(c, n) if stored else pol.choose_rebuild(c, n, pos_scores)
        # this step's figures stay on the device and reach the host with the tokens (one transfer):
        # rebuilt tokens (recomputed or restored), attended tokens, released tokens, cached tokens
        # after the cut, stored tokens
        counts = [rb_ok.sum()]

        # 3. rows -> free slots -> all layers
        ids = torch.cat([c.tok_at[:n].gather(1, rb_pos), cur_tok[:, None]], 1)
        row_pos = torch.cat([torch.where(rb_ok, rb_pos, -1), cur_pos[:, None]], 1)
        slots = c.free_slots(n, row_pos.shape[1])
        slots = torch.where(row_pos >= 0, slots, c.trash)
        c.pos[:n].scatter_(1, slots, row_pos)  # padded rows write -1 into the trash slot
        c.mass[:n].scatter_(1, slots, torch.zeros_like(row_pos, dtype=c.mass.dtype))
        counts.append(c.valid(n).sum(1).max())
        q = self.queries[:, :n] if self.queries is not None else None
        with record_function("adore.layers"):
            if self.graphed is not None:
                hidden, mass = self.graphed(ids, row_pos, slots)
            else:
                hidden, mass = forward_slots(self.model, c, ids, row_pos, slots, top_k=pol.top_k,
                                             want_mass=pol.needs_mass, pack=self.pack_rows, queries=q)
            if mass is not None:
                c.mass[:n, : mass.shape[1]] += mass
            logits = self.lm_head(hidden[:, -1:])[:, 0]
        with record_function("adore.policy.observe"):
            pos_scores = pol.observe(c, n, cur_pos, q, pos_scores)

        # 4. stored tokens that now outscore cached ones come back with the K/V they left with, then
        # the cut down to the budget, one decision for all layers: the next step attends to m + 1
        if stored:
            with record_function("adore.policy.readmit"):
                back, back_ok = pol.choose_rebuild(c, n, pos_scores)
                counts[0] = counts[0] + c.restore(back, back_ok)
        if self.trace is not None:
            self.trace.append({"rows": list(self.rows), "cur_pos": cur_pos.clone(),
                               "rebuilt": [rb_pos[i][rb_ok[i]].tolist() for i in range(n)],
                               "pos_scores": None if pos_scores is None else pos_scores.clone(),
                               "step_pos": c.pos[:n, : c.capacity].clone(),
                               "mass": c.mass[:n, : c.capacity].clone()})
        if pol.budget is not None:  # (rows under the budget keep every valid slot: nothing drops)
            with record_function("adore.policy.release"):
                valid = c.valid(n)
                view = SlotView(c.pos[:n, : c.capacity], cur_pos, c.mass[:n, : c.capacity], pos_scores)
                drop = valid & ~select_keep(pol, view, valid)
                released = c.release(drop, pos_scores, most=c.capacity - pol.budget)
        else:
            released = counts[0].new_zeros(())
        counts.append(released)
        counts.append(c.valid(n).sum(1).max())
        if c.store_pos is not None:
            counts += [c.stored(n).sum(), c.store_used(n)]

        # 5. next tokens
        for req in reqs:
            req.next_pos += 1
        with record_function("adore.tokens"):
            rebuilt, step_tokens, released, held, *stored = self._next_tokens(reqs, logits, outs, torch.stack(counts))
        st = self.stats
        st["rebuilt"] += int(rebuilt)
        st["released"] += int(released)
        if stored:
            st["stored_tokens"] = int(stored[0])
            c.store_bound = int(stored[1])  # what the next step's scorer reads of the stores
        st["steps"] += 1
        st["decode_tokens"] += n
        st["peak_cache_tokens"] = max(st["peak_cache_tokens"], int(held))
        st["peak_step_tokens"] = max(st["peak_step_tokens"], int(step_tokens))

    def _to_device(self, rows: list[list], dtype=torch.long) -> torch.Tensor:
        """Host numbers [k][n] -> a [k, n] tensor on the engine's device, without a device sync: a plain
        host-to-device copy waits for the device to finish its queue, a copy from pinned memory does
        not (the caching host allocator keeps the buffer alive until the copy has run)."""
        t = torch.tensor(rows, dtype=dtype)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # -- tokens out ------------------------------------------------------------------------------
    def _next_tokens(self, reqs: list[_Request], logits: torch.Tensor, outs: list[StepOutput],
                     extra: torch.Tensor | None = None) -> list[float]:
        """Choose and emit the next token of each request (in a row) from logits [n, V]; the rows of
        those that finish are freed. extra [k]: device figures that cross with the tokens (returned)."""
        done, failed = [], []
        toks, lps, hits, extra = self._choose(reqs, logits, extra)
        for i, req in enumerate(reqs):
            try:  # per-row host work (detokenising, stop strings): a failure ends that row only
                self._emit(req, toks[i], lps[i], hits[i], outs)
            except Exception as e:  # noqa: BLE001
                failed.append((req, e))
                continue
            if req.finish_reason is not None:
                done.append(self.rows.index(req.rid))
        self._free_rows(done)
        for req, e in failed:
            self._fail([req], e, outs)
        return extra

    def _choose(self, reqs: list[_Request], logits: torch.Tensor, extra: torch.Tensor | None = None
                ) -> tuple[list[int], list[float], list[bool], list[float]]:
        """Next token, its log-probability and whether it is the argmax, for each request: logits [n, V];
        and extra [k] (figures the step kept on the device), as floats.

        Greedy, forced and sampled rows are decided in batched ops and cross to the host once (a
        per-row `.item()` would cost one device sync per sequence)."""
        n = len(reqs)
        greedy = torch.argmax(logits, dim=-1)
        tok = greedy.clone()
        forced = [i for i, r in enumerate(reqs) if r.params.forced_tokens is not None]
        if forced:
            at, forced_tok = self._to_device([forced, [reqs[i].params.forced_tokens[len(reqs[i].out)]
                                                       for i in forced]])
            tok[at] = forced_tok
        sampled = [i for i, r in enumerate(reqs) if r.params.forced_tokens is None and r.params.temperature > 0]
        if sampled:  # in one batch; each row draws from its own seeded generator
            dev, ps = tok.device, [reqs[i].params for i in sampled]
            rows = self._to_device([sampled])[0]
            knobs = self._to_device([[p.temperature for p in ps], [p.top_p for p in ps]], torch.float32)
            tok[rows] = sample_tokens(logits[rows], knobs[0], knobs[1],
                                      draw_uniforms([reqs[i].gen for i in sampled], dev))
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, tok[:, None])[:, 0]
        flat = torch.stack([tok.double(), logp.double(), (tok == greedy).double()]).flatten()
        if extra is not None:
            flat = torch.cat([flat, extra.double()])
        host = flat.tolist()  # the step's one device-to-host transfer
        return ([int(t) for t in host[:n]], host[n : 2 * n], [h > 0.5 for h in host[2 * n : 3 * n]],
                host[3 * n :])

    def _emit(self, req: _Request, tok: int, logprob: float, top1: bool, outs: list[StepOutput]) -> None:
        p = req.params
        req.out.append(tok)
        req.logprobs.append(logprob)
        req.top1.append(top1)
        stop_ids = set(p.stop_token_ids) if p.stop_token_ids is not None else self.eos_ids
        reason = None
        if p.forced_tokens is None and not p.ignore_eos and tok in stop_ids:
            text, reason = "", "stop"
        else:
            text = req.detok.add(tok)
            if req.detok.stopped:
                reason = "stop"
        if reason is None and len(req.out) >= p.max_tokens:
            reason, text = "length", text + req.detok.flush()
        req.finish_reason = reason
        outs.append(StepOutput(req.rid, tok, text, reason is not None, reason, logprob))

    def _finish(self, req: _Request, reason: str, outs: list[StepOutput]) -> None:
        req.finish_reason = reason
        outs.append(StepOutput(req.rid, None, "", True, reason))

    def _free_rows(self, rows: list[int]) -> None:
        """Free finished rows, keeping the active rows packed: the last active row moves into each hole."""
        for row in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if row != last:
                self.cache.move(last, row)
                self.rows[row] = self.rows[last]
            else:
                self.cache.clear(row)
            self.rows.pop()

    # -- convenience -----------------------------------------------------------------------------
    def result(self, rid: str) -> RequestOutput:
        r = self.requests[rid]
        return RequestOutput(rid, r.prompt, list(r.out), r.detok.text, r.finish_reason, list(r.logprobs),
                             list(r.top1))

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 progress=None) -> list[RequestOutput]:
        """Run prompts to completion (continuous batching when there are more than max_batch)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work():
            outs = self.step()
            if progress is not None:
                progress(outs)
        results = [self.result(r) for r in rids]
        for r in rids:
            self.requests.pop(r, None)
        return results

    def warm_up(self) -> None:
        """Run the largest step the engine will take once, on made-up prompts, before serving: a full
        prefill chunk (max_prefill_tokens over every row) and two decode steps, then forget them.

        The first step of each shape pays for memory the process has not touched yet (on a CPU the
        allocator's fresh pages: a new process's first burst of 32 prompts reached its median first
        token over a second later than the next burst did) and, on a GPU, for kernels compiled on
        first use. Servers call this at start, so that their first users do not pay. Every rank of a
        tensor-parallel group runs it alike (the same steps, in lock-step)."""
        per_row = max(1, min(self.max_prefill_tokens // self.max_batch, self.max_seq_len - 2))
        rids = [self.add_request([(7 * i + 3 * j) % self.vocab_size for j in range(per_row)],
                                 SamplingParams(max_tokens=2, ignore_eos=True)) for i in range(self.max_batch)]
        while self.has_work():
            self.step()
        for rid in rids:
            self.requests.pop(rid, None)
        self.stats = dict.fromkeys(self.stats, 0)

    def release_finished(self) -> None:
        """Forget finished requests (servers call this after reading their results)."""
        for rid in [r for r, q in self.requests.items() if q.finish_reason is not None]:
            del self.requests[rid]
