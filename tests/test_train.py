"""Training: attention labels, the controller, QLoRA fine-tuning, and their CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adore import AdoreConfig, SamplingParams
from adore.cli import main
from adore.controller import Controller, ControllerConfig
from adore.engine import Engine
from adore.policies import make_policy
from adore.train.controller import TrainConfig, save_checkpoint, train_controller
from adore.train.labels import LabelConfig, attention_topk, build_dataset, dense_labels, segments
from adore.train.metrics import evaluate

DATA = Path(__file__).resolve().parents[1] / "data" / "austen"


@pytest.mark.parametrize("layers", ["all", "1:"])
def test_labels_match_brute_force(tiny_gqa, layers):
    """Chunked, streamed labels = top-K of eager attention averaged over layers and heads."""
    model, tok, _ = tiny_gqa
    ids = torch.tensor(tok.encode((DATA / "emma.txt").read_text()[:300])[:90])
    cfg = LabelConfig(top_k=10, keep=20, layers=layers, chunk=16)
    idx, val = attention_topk(model, ids, cfg)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(ids[None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    lids = cfg.layer_ids(len(att))
    avg = torch.stack([att[i][0] for i in lids]).mean((0, 1))  # [T, T]
    T = len(ids)
    for t in range(T):
        k = min(cfg.keep, t + 1)
        ref = avg[t, : t + 1].topk(k)
        assert set(idx[t, :k].tolist()) == set(ref.indices.tolist())
        assert torch.allclose(val[t, :k].float(), ref.values, atol=1e-3)
        assert (idx[t, k:] == -1).all()
    lab = dense_labels(idx, 10, T)
    assert lab.sum(1).tolist() == [min(10, t + 1) for t in range(T)]
    assert not (lab & ~torch.ones(T, T, dtype=torch.bool).tril()).any()


@pytest.fixture(scope="module")
def tiny_data(tiny):
    model, tok, _ = tiny
    texts = [(DATA / f).read_text()[:3000] for f in ("emma.txt", "prideprejudice.txt")]
    seqs = segments(tok, texts, 128, per_text=6)
    data = build_dataset(model, seqs, LabelConfig(top_k=16, keep=32, seq_len=128), progress=False)
    held = segments(tok, [(DATA / "northangerabbey.txt").read_text()[:2000]], 128, max_segments=3)
    return data, build_dataset(model, held, LabelConfig(top_k=16, keep=32, seq_len=128), progress=False)


def test_trained_controller_beats_random(tiny, tiny_data):
    model, _, _ = tiny
    data, held = tiny_data
    cfg = TrainConfig(steps=60, batch=4, rows=32, lr=1e-2, eval_every=30, top_k=16, budget=32, rebuild=2,
                      listwise=1.0)
    ctrl, report = train_controller(data, model.model.embed_tokens, cfg, progress=False)
    torch.manual_seed(0)
    rand = Controller(ctrl.cfg)
    for p in rand.parameters():
        torch.nn.init.normal_(p, std=0.2)
    emb = model.model.embed_tokens(held["ids"].long()).float()
    got = evaluate(ctrl, emb, held["idx"], held["val"], 16, 32, 2, dynamic=False)
    base = evaluate(rand, emb, held["idx"], held["val"], 16, 32, 2, dynamic=False)
    assert got["topk_overlap"] > base["topk_overlap"] + 0.02
    assert got["static_topk_mass:adore"] > base["static_topk_mass:adore"]
    assert report["history"] and report["best_val_loss"] < float("inf")


def test_checkpoint_round_trip(tiny, tiny_data, tmp_path):
    model, _, _ = tiny
    data, _ = tiny_data
    cfg = TrainConfig(steps=3, batch=2, rows=16, eval_every=3, top_k=16, budget=32, rebuild=2)
    ctrl, report = train_controller(data, model.model.embed_tokens, cfg,
                                    ControllerConfig(embed_dim=64, hidden_dim=32), progress=False)
    path = str(tmp_path / "c.safetensors")
    save_checkpoint(ctrl, report, path)
    back = Controller.load(path)
    assert back.cfg == ctrl.cfg
    emb, pos = torch.randn(20, 64), torch.arange(20)
    assert torch.equal(ctrl.run(emb, pos), back.run(emb, pos))
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["train_config"]["steps"] == 3 and "val_metrics" in meta


def test_run_batch_matches_step():
    ctrl = Controller(ControllerConfig(embed_dim=16))
    emb, pos = torch.randn(2, 9, 16), torch.arange(9)[None].repeat(2, 1)
    seq = ctrl.run_batch(emb, pos)
    h = ctrl.init_state(2, "cpu")
    for t in range(9):
        h = ctrl.step(emb[:, t], pos[:, t], h)
    assert torch.allclose(h, seq[:, -1], atol=1e-6)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("quantize", [False, True])
def test_lora_adapter_changes_outputs_and_loads_back(tmp_path, quantize):
    from adore.models import ModelInfo, load_model
    from adore.train.finetune import FinetuneConfig, apply_adapter, finetune

    model, tok, _ = load_model("random:tiny")
    ids = torch.tensor(tok.encode((DATA / "emma.txt").read_text()[:2000]))
    seqs = [ids[i : i + 48] for i in range(0, 480, 48)]
    before = _logits(load_model("random:tiny")[0], ids[:48])
    cfg = FinetuneConfig(top_k=8, seq_len=48, steps=4, lr=1e-2, quantize=quantize)
    pm, report = finetune(model, seqs, cfg, out_dir=str(tmp_path / "ad"), progress=False)
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists() and report["steps"] == 4

    def merged():
        base, _, info = load_model("random:tiny")
        return apply_adapter(base, info, str(tmp_path / "ad"))

    (a, info), (b, _) = merged(), merged()
    assert info == ModelInfo(name="random:tiny", tuned_top_k=8)  # the K it was trained under, from its report
    la, lb = _logits(a, ids[:48]), _logits(b, ids[:48])
    assert torch.equal(la, lb)  # loads back identically
    assert (la - before).abs().max() > 1e-3  # and changes the model
    assert type(a.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # merged: engine unchanged
    if not quantize:  # the merged model computes what the trained (unmerged) one does
        pm.base_model.model.set_attn_implementation("sdpa")
        assert torch.allclose(_logits(pm, ids[:48]), la, atol=1e-4)


def test_distilled_adapter_brings_topk_attention_closer_to_dense(tmp_path):
    from adore.models import load_model
    from adore.train.finetune import FinetuneConfig, dense_teacher_logits, distill_loss, finetune, make_lora

    model, tok, _ = load_model("random:tiny")
    ids = torch.tensor(tok.encode((DATA / "emma.txt").read_text()[:4000]))
    seqs = [ids[i : i + 48] for i in range(0, 960, 48)]
    held = torch.stack([ids[i : i + 48] for i in range(960, 1200, 48)])
    dense = _logits(load_model("random:tiny")[0], held[0])
    cfg = FinetuneConfig(top_k=4, seq_len=48, steps=100, lr=1e-2, quantize=False, distill=True, lora_r=4)
    fresh = make_lora(load_model("random:tiny")[0], cfg)  # LoRA B starts at zero: the base under top-K
    # the teacher is the base model with dense attention, whatever K the student runs with
    assert torch.allclose(dense_teacher_logits(fresh, held[:1])[0], dense, atol=1e-4)
    with torch.no_grad():
        before = distill_loss(fresh, held).item()
    pm, report = finetune(model, seqs, cfg, out_dir=str(tmp_path / "ad"), progress=False)
    with torch.no_grad():
        after = distill_loss(pm, held).item()
    assert report["config"]["distill"] and after < 0.8 * before, (before, after)
    # --init-adapter: training goes on from the saved adapter, not from scratch
    again, _ = finetune(load_model("random:tiny")[0], seqs, FinetuneConfig(**{**cfg.__dict__, "steps": 0}),
                        progress=False, init=str(tmp_path / "ad"))
    with torch.no_grad():
        assert distill_loss(again, held).item() == pytest.approx(after, rel=1e-4)


def test_argmax_hinge_counts_only_argmax_margins_short_of_the_teachers():
    from adore.train.finetune import argmax_margin

    logp = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]]), -1)
    assert argmax_margin(logp, torch.tensor([1, 0])).tolist() == pytest.approx([1.0, -5.0])


def test_distill_hinge_is_zero_for_dense_and_adds_under_topk():
    """With dense attention a fresh adapter is the teacher: KL and hinge both 0. Under top-K the hinge
    adds a non-negative term (hard x the argmax shortfall)."""
    from adore.models import load_model
    from adore.train.finetune import FinetuneConfig, distill_loss, make_lora

    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    dense = make_lora(load_model("random:tiny")[0], FinetuneConfig(top_k=None, quantize=False, distill=True))
    sparse = make_lora(load_model("random:tiny")[0], FinetuneConfig(top_k=3, quantize=False, distill=True))
    with torch.no_grad():
        assert distill_loss(dense, ids, hard=5.0).item() == pytest.approx(0.0, abs=1e-5)
        kl, both = distill_loss(sparse, ids).item(), distill_loss(sparse, ids, hard=1.0).item()
        assert kl > 0 and both > kl
        assert distill_loss(sparse, ids, hard=2.0).item() == pytest.approx(kl + 2 * (both - kl), rel=1e-4)


def test_cli_finetune_self_generated_distill(tmp_path):
    emma = str(DATA / "emma.txt")
    ad = tmp_path / "ad"
    assert main(["finetune", "--model", "random:tiny", "--text-files", emma, "--seq-len", "24",
                 "--self-generated", "3", "--prompt-len", "16", "--distill", "--hard", "1", "--no-quantize",
                 "--steps", "2", "--top-k", "8", "--out", str(ad)]) == 0
    rep = json.loads((ad / "adore_finetune.json").read_text())
    assert rep["self_generated"] == 3 and rep["config"]["hard"] == 1.0 and rep["config"]["seq_len"] == 24
    # bad combinations are refused before any work
    assert main(["finetune", "--model", "random:tiny", "--text-files", emma, "--hard", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["finetune", "--model", "random:tiny", "--text-files", emma, "--self-generated", "2",
                 "--prompt-len", "64", "--seq-len", "32", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_cli_train_controller_and_finetune(tmp_path, capsys):
    emma = str(DATA / "emma.txt")
    out = tmp_path / "ctrl.safetensors"
    assert main(["train-controller", "--model", "random:tiny", "--text-files", emma,
                 "--seq-len", "64", "--per-text", "3", "--steps", "4", "--top-k", "8", "--budget", "16",
                 "--rebuild", "2", "--out", str(out), "--heldout-file", str(DATA / "northangerabbey.txt"),
                 "--save-labels", str(tmp_path / "lab.safetensors")]) == 0
    rep = json.loads((tmp_path / "ctrl.json").read_text())
    assert "heldout_metrics" in rep and "precision" in rep["val_metrics"]
    assert main(["train-controller", "--model", "random:tiny", "--labels", str(tmp_path / "lab.safetensors"),
                 "--steps", "2", "--top-k", "8", "--budget", "16", "--out", str(tmp_path / "c2.safetensors")]) == 0
    ad = tmp_path / "ad"
    assert main(["finetune", "--model", "random:tiny", "--text-files", emma, "--seq-len", "32",
                 "--steps", "2", "--top-k", "8", "--out", str(ad)]) == 0
    capsys.readouterr()
    assert main(["ppl", "--model", "random:tiny", "--policy", "adore", "--scorer", "controller",
                 "--controller", str(out),
                 "--adapter", str(ad), "--cache-size", "16", "--text-file", emma, "--tokens", "40",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == 39
    assert main(["train-controller", "--model", "random:tiny", "--out", str(tmp_path / "x")]) == 2


def test_self_generated_is_prompt_plus_greedy_continuation(tiny):
    from adore.train.labels import self_generated

    model, tok, _ = tiny
    prompts = [torch.arange(5, 5 + n) for n in (8, 8, 8)]
    seqs = self_generated(model, tok, prompts, 12, batch=2)
    eng = Engine(model, tok, make_policy("full", AdoreConfig()), max_batch=1, max_seq_len=32)
    for p, s in zip(prompts, seqs):
        alone = eng.generate([p.tolist()], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
        assert s.tolist() == p.tolist() + alone


def test_fine_tuning_from_init_never_ends_worse(tiny, tiny_data):
    """init: the starting controller is the first candidate, so the result's validation loss is at
    most the start's; row_min restricts the rows (and a bad one is refused)."""
    model, _, _ = tiny
    data, _ = tiny_data
    base_cfg = TrainConfig(steps=20, batch=4, rows=32, lr=1e-2, eval_every=10, top_k=16, budget=32, rebuild=2)
    start, _ = train_controller(data, model.model.embed_tokens, base_cfg, progress=False)
    cfg = TrainConfig(steps=10, batch=4, rows=32, lr=5e-2, eval_every=5, top_k=16, budget=32, rebuild=2,
                      row_min=64)
    tuned, report = train_controller(data, model.model.embed_tokens, cfg, progress=False, init=start)
    assert report["history"][0]["step"] == 0
    assert report["best_val_loss"] <= report["history"][0]["val_loss"]
    assert tuned.cfg == start.cfg and tuned is not start
    with pytest.raises(ValueError, match="row_min"):
        train_controller(data, model.model.embed_tokens, TrainConfig(steps=1, row_min=128, top_k=16),
                         progress=False)


def test_cli_train_controller_self_generated(tmp_path):
    emma = str(DATA / "emma.txt")
    first = tmp_path / "a.safetensors"
    assert main(["train-controller", "--model", "random:tiny", "--text-files", emma, "--seq-len", "64",
                 "--per-text", "3", "--steps", "2", "--top-k", "8", "--budget", "16", "--out", str(first)]) == 0
    out = tmp_path / "b.safetensors"
    assert main(["train-controller", "--model", "random:tiny", "--text-files", emma, "--self-generated", "4",
                 "--prompt-len", "16", "--seq-len", "48", "--rows-from", "16", "--init", str(first),
                 "--steps", "2", "--top-k", "8", "--budget", "16", "--out", str(out)]) == 0
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["self_generated"] == 4 and rep["init"] == str(first)
    assert rep["sequences"]["tokens_per_sequence"] == 48 and rep["train_config"]["row_min"] == 16
    assert main(["train-controller", "--model", "random:tiny", "--text-files", emma, "--self-generated", "4",
                 "--prompt-len", "64", "--seq-len", "48", "--out", str(out)]) == 2
    assert main(["train-controller", "--model", "random:tiny", "--text-files", emma, "--init",
                 str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2


def test_model_tuned_under_topk_prefills_under_topk():
    """A model whose ModelInfo names a top-K adapter reads its prompt with top-K attention (what it was
    trained under): the engine's first token log-prob equals the top-K transformers forward's, and
    a plain model keeps the dense prefill."""
    from dataclasses import replace

    from adore.attention import forward_prompt
    from adore.models import load_model
    from adore.train.finetune import set_topk_attention

    model, tok, info = load_model("random:tiny")
    ids = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(1))
    dense_h = forward_prompt(model, ids)[0]
    topk_h = forward_prompt(model, ids, top_k=4)[0]
    assert not torch.allclose(dense_h, topk_h, atol=1e-3)
    ref = load_model("random:tiny")[0]
    set_topk_attention(ref, 4)
    with torch.no_grad():
        want = torch.log_softmax(ref(input_ids=ids).logits[0, -1].float(), -1)
    pol = make_policy("adore", AdoreConfig(cache_size=64, top_k=4))
    assert Engine(model, tok, pol, info=info, max_batch=1, max_seq_len=40).prefill_top_k is None
    eng = Engine(model, tok, pol, info=replace(info, tuned_top_k=4), max_batch=1, max_seq_len=40)
    assert eng.prefill_top_k == 4
    nxt = int(want.argmax())
    out = eng.generate([ids[0].tolist()], SamplingParams(forced_tokens=[nxt]))[0]
    assert out.logprobs[0] == pytest.approx(want[nxt].item(), abs=1e-4)


def test_topk_attention_per_layer_k():
    """set_topk_attention(per_layer=): top-K in the named layers only; a later call without it clears it."""
    from adore.models import load_model
    from adore.train.finetune import set_topk_attention

    model, _, _ = load_model("random:tiny")
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(2))

    def logits(top_k, per_layer=None):
        set_topk_attention(model, top_k, per_layer)
        with torch.no_grad():
            return model(input_ids=ids).logits

    dense, everywhere = logits(None), logits(2)
    first_only = logits(None, {0: 2})
    assert not torch.allclose(first_only, dense, atol=1e-4) and not torch.allclose(first_only, everywhere, atol=1e-4)
    assert torch.allclose(logits(2, {i: None for i in range(len(model.model.layers))}), dense, atol=1e-5)
    assert torch.allclose(logits(None), dense, atol=1e-6)  # per-layer K from the last call is gone
    # the K is kept beside the model, not on it
    assert not hasattr(model.config, "adore_top_k") and not hasattr(model.model.layers[0].self_attn, "adore_top_k")


def test_scorer_rows_are_decayed_attention_and_future_attention():
    """The v2 scorer's training rows: features = the decayed averages AdorePolicy.observe keeps,
    label = the attention each position receives from the next `horizon` queries."""
    from adore.train.scorer import ScorerTrainConfig, rows_of

    g = torch.Generator().manual_seed(0)
    A = torch.rand(40, 40, generator=g).tril()
    A = A / A.sum(1, keepdim=True)
    d = rows_of(A, (0.0, 0.5), ScorerTrainConfig(horizon=3, rows_from=10, row_stride=5))
    assert d["t"].tolist() == [10, 15, 20, 25, 30, 35]
    for r, t in enumerate(d["t"].tolist()):
        torch.testing.assert_close(d["label"][r], A[t + 1 : t + 4].sum(0))
        torch.testing.assert_close(d["ema"][r][:, 0], A[t])
        ema = torch.zeros(40)
        for s in range(t + 1):
            ema = 0.5 * ema + 0.5 * A[s]
        torch.testing.assert_close(d["ema"][r][:, 1], ema)


def test_scorer_training_writes_a_scorer_the_policy_loads(tmp_path):
    from adore.scorer import LearnedScorer
    from adore.train.scorer import main as train_scorer

    out = tmp_path / "scorer.safetensors"
    emma = str(Path(__file__).resolve().parents[1] / "data" / "austen" / "emma.txt")
    assert train_scorer(["--model", "random:tiny", "--text-files", emma, "--heldout-file", emma, "--per-text", "1",
                         "--seq-len", "96", "--rows-from", "16", "--budget", "16", "--steps", "20",
                         "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["heldout_recall_at_m"]) == {"learned", "ema_0.5"} and report["command"]
    scorer = LearnedScorer.load(str(out))
    pol = make_policy("adore", AdoreConfig(cache_size=16, scorer="learned"))
    pol.learned = scorer
    assert scorer.n_features == len(pol.decays) == 6
