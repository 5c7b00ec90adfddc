"""Lossless River (verify mode): identical greedy output, exact sampling distribution, exact KV."""

from __future__ import annotations

import numpy as np
import pytest

from river.compiler.compile import compile_river
from river.compiler.draft_graph import draft_graph
from river.compiler.graph_io import load_onnx, save_onnx_atomic
from river.errors import RiverError
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.ort_backend import OrtBackend
from river.runtime.sampling import next_token_probs
from river.runtime.speculative import SpeculativeGenerator
from tests_helpers import assert_one_line_error, torch_step

PROMPTS = ["hello there", "rivers and seas", "0123456789", "spec"]


@pytest.fixture(scope="module")
def tiny_river_int4(tiny_onnx, tmp_path_factory):
    # int4 twins of the tiny random model disagree with it often enough to exercise rejections
    return compile_river(tiny_onnx, tmp_path_factory.mktemp("spec") / "r", gates="0,2", river="int4", log=None)


@pytest.fixture(scope="module")
def tiny_drafts(tiny_onnx, tmp_path_factory):
    """Draft graphs: all-twin 4-bit (disagrees often: rejections), 8-bit after layer 1."""
    work = tmp_path_factory.mktemp("drafts")
    model = load_onnx(tiny_onnx)
    return {"all4": save_onnx_atomic(draft_graph(model, -1, bits=4), work / "all4" / "model.onnx"),
            "e1": save_onnx_atomic(draft_graph(model, 1), work / "e1" / "model.onnx")}


def _draft_generator(tiny, tiny_onnx, tiny_drafts, name, **kw):
    return SpeculativeGenerator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer,
                                draft=OrtBackend(tiny_drafts[name], threads=1, single_token=True), **kw)


@pytest.fixture(scope="module")
def full_greedy(tiny, tiny_onnx):
    gen = Generator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer)
    return {p: gen.generate(p, GenerationConfig(max_new_tokens=40, eos_token_ids=[])).token_ids for p in PROMPTS}


@pytest.mark.parametrize("gate, k, adaptive", [(0, 1, False), (0, 4, False), (1, 3, False), (0, 2, True), (1, 8, False)])
def test_greedy_identical_to_full_model(tiny, tiny_river_int4, full_greedy, gate, k, adaptive):
    spec = SpeculativeGenerator(OrtBackend(tiny_river_int4, threads=1), tiny.tokenizer, draft_gate=gate, k=k, adaptive=adaptive,
                                skip_drafting=False)  # every round drafts, whatever the timings
    rejected = 0
    for prompt in PROMPTS:
        result = spec.generate(prompt, GenerationConfig(max_new_tokens=40, eos_token_ids=[]))
        assert result.token_ids == full_greedy[prompt], prompt
        rejected += spec.stats.drafted - spec.stats.accepted
    if (gate, k) == (0, 4):
        assert rejected > 0, "the draft never disagreed: the test would not exercise rollback"


@pytest.mark.parametrize("draft, k, adaptive", [("all4", 1, False), ("all4", 4, False), ("e1", 3, False), ("all4", 2, True)])
def test_greedy_identical_with_draft_graph(tiny, tiny_onnx, tiny_drafts, full_greedy, draft, k, adaptive):
    spec = _draft_generator(tiny, tiny_onnx, tiny_drafts, draft, k=k, adaptive=adaptive, skip_drafting=False)
    rejected = 0
    for prompt in PROMPTS:
        result = spec.generate(prompt, GenerationConfig(max_new_tokens=40, eos_token_ids=[]))
        assert result.token_ids == full_greedy[prompt], prompt
        rejected += spec.stats.drafted - spec.stats.accepted
    if (draft, k) == ("all4", 4):
        assert rejected > 0, "the draft never disagreed: the test would not exercise rollback"


@pytest.mark.parametrize("draft", ["river", "graph"])
def test_kv_exact_below_valid_length_and_nothing_beyond_is_read(tiny, tiny_onnx, tiny_river_int4, tiny_drafts,
                                                                full_greedy, draft):
    if draft == "river":
        spec = SpeculativeGenerator(OrtBackend(tiny_river_int4, threads=1), tiny.tokenizer, draft_gate=0, k=4)
    else:
        spec = _draft_generator(tiny, tiny_onnx, tiny_drafts, "all4", k=4)
    checks = []
    orig_verify = spec.verify
    prompt_ids = spec.encode("hello there")
    emitted: list[int] = []

    def verify(pending, drafted, dists, start, cache, cfg, rng):
        out = orig_verify(pending, drafted, dists, start, cache, cfg, rng)
        seq = prompt_ids + emitted + [pending] + out[:-1]  # tokens whose K/V are now valid
        emitted.extend([pending] + out[:-1])
        assert cache.length == len(seq)
        _, ref = torch_step(tiny.model, np.asarray([seq]))
        for buf, r in zip(cache.buffers(), ref):
            np.testing.assert_allclose(buf[:, :, :cache.length], r.numpy(), atol=1e-4)
            buf[:, :, cache.length:] = np.random.default_rng(len(checks)).normal(0, 1e3, buf[:, :, cache.length:].shape)
        checks.append(cache.length)
        return out

    spec.verify = verify
    result = spec.generate(prompt_ids, GenerationConfig(max_new_tokens=40, eos_token_ids=[]))
    assert result.token_ids == full_greedy["hello there"]
    assert len(checks) >= 8 and checks == sorted(checks)


@pytest.mark.parametrize("draft", ["river", "graph"])
def test_sampling_matches_backbone_distribution(tiny, tiny_onnx, tiny_river_int4, tiny_drafts, draft):
    """The token after a speculative round is distributed as the backbone's p (not the draft's q)."""
    temperature, top_p = 0.8, 0.7
    cfg = GenerationConfig(max_new_tokens=2, temperature=temperature, top_p=top_p, eos_token_ids=[])
    if draft == "river":
        spec = SpeculativeGenerator(OrtBackend(tiny_river_int4, threads=1), tiny.tokenizer, draft_gate=0, k=1)
    else:
        spec = _draft_generator(tiny, tiny_onnx, tiny_drafts, "all4", k=1)
    backend = spec.backend
    prompt = spec.encode("sample me", chat=False)
    pending = 65
    # exact backbone and draft distributions for the token after `pending`
    plain = OrtBackend(tiny_onnx, threads=1)
    cache = plain.new_cache(len(prompt) + 4)
    plain.prefill(np.asarray([prompt]), cache)
    cache.length = len(prompt)
    p = next_token_probs(plain.decode(np.asarray([[pending]]), cache)[0, -1].copy(), temperature, top_p)
    rcache = backend.new_cache(len(prompt) + 4)
    backend.prefill(np.asarray([prompt]), rcache)
    rcache.length = len(prompt)
    _drafted, dists = spec.draft(pending, rcache, 1, cfg, np.random.default_rng(0))
    q = dists[0]  # the draft's distribution, as the draft step computed it
    assert 0.5 * np.abs(p - q).sum() > 0.1, "draft and backbone agree too closely for the test to mean anything"

    rng = np.random.default_rng(1234)
    n, tokens = 3000, []
    for _ in range(n):
        cache = backend.new_cache(len(prompt) + 4)
        backend.prefill(np.asarray([prompt]), cache)
        cache.length = len(prompt)
        drafted, dists = spec.draft(pending, cache, 1, cfg, rng)
        tokens.append(spec.verify(pending, drafted, dists, len(prompt), cache, cfg, rng)[0])
    tv = assert_drawn_from(tokens, [p] * n)
    assert 0.5 * np.abs(np.bincount(tokens, minlength=len(q)) / n - q).sum() > 2 * tv  # the draft's q is rejected


def assert_drawn_from(tokens: list[int], dists: list[np.ndarray]) -> float:
    """Each tokens[i] was drawn from dists[i] (exact, each possibly different): the pooled counts
    against the pooled expectation. Tolerance: the total variation distance within 2.5x its expected
    value under sampling noise (0.5 * sum sqrt(2 var / pi) / n), and a chi-square goodness of fit on
    cells expecting >= 5 (the rest pooled), by its normal approximation, z < 4 (p > 3e-5). Returns the TV."""
    probs = np.stack(dists)
    n = len(tokens)
    counts = np.bincount(tokens, minlength=probs.shape[1]).astype(float)
    expected = probs.sum(0)
    tv = 0.5 * np.abs(counts - expected).sum() / n
    noise = 0.5 * np.sqrt(2 * (probs * (1 - probs)).sum(0) / np.pi).sum() / n
    assert tv < 2.5 * noise, (tv, noise)
    cells = expected >= 5
    observed = np.append(counts[cells], counts[~cells].sum())
    expected = np.append(expected[cells], expected[~cells].sum())
    keep = expected > 0
    chi2 = (((observed[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    dof = keep.sum() - 1
    assert (chi2 - dof) / np.sqrt(2 * dof) < 4, (chi2, dof)
    return tv


def test_generate_sampling_follows_the_backbone(tiny, tiny_onnx, tiny_drafts):
    """generate() with temperature, top-p and a seed, k=2 over the 4-bit draft graph (rejections and
    full acceptances both frequent): every token a round keeps - the first, the later ones, the bonus -
    is distributed as the backbone's own next-token distribution given everything before it, computed
    independently by the torch model over the whole sequence. 1000 draws of 5 tokens."""
    temperature, top_p, k = 0.8, 0.7, 2
    spec = _draft_generator(tiny, tiny_onnx, tiny_drafts, "all4", k=k)
    rounds: list[tuple[list[int], int]] = []  # (tokens a round kept, how many were drafted)
    orig_verify = spec.verify

    def verify(pending, drafted, dists, start, cache, cfg, rng):
        out = orig_verify(pending, drafted, dists, start, cache, cfg, rng)
        rounds.append((out, len(drafted)))
        return out

    spec.verify = verify
    prompt = spec.encode("sample me", chat=False)
    draws = []  # (sequence after the prompt, the rounds that produced it)
    for seed in range(1000):
        rounds.clear()
        cfg = GenerationConfig(max_new_tokens=5, temperature=temperature, top_p=top_p, seed=seed, eos_token_ids=[])
        result = spec.generate(prompt, cfg)
        seq = [result.token_ids[0]] + [t for out, _ in rounds for t in out]  # rounds may overshoot the limit
        assert seq[:len(result.token_ids)] == result.token_ids and len(result.token_ids) == 5
        draws.append((seq, list(rounds)))
    pools = {"first of a round": ([], []), "later in a round": ([], []), "bonus": ([], [])}
    for length in {len(seq) for seq, _ in draws}:  # one batched torch run per sequence length
        batch = [(seq, rs) for seq, rs in draws if len(seq) == length]
        logits, _ = torch_step(tiny.model, np.asarray([prompt + seq[:-1] for seq, _ in batch]))
        for row_logits, (seq, rs) in zip(logits[:, len(prompt) - 1:], batch):
            exact = [next_token_probs(row, temperature, top_p) for row in row_logits]  # exact[i]: for seq[i]
            i = 1
            for out, drafted in rs:
                for j, tok in enumerate(out):
                    pool = "bonus" if j == drafted else "first of a round" if j == 0 else "later in a round"
                    pools[pool][0].append(tok)
                    pools[pool][1].append(exact[i])
                    i += 1
    assert all(len(toks) >= 300 for toks, _ in pools.values()), {k: len(v[0]) for k, v in pools.items()}
    for name, (toks, dists) in pools.items():
        assert_drawn_from(toks, dists)
    again = spec.generate(prompt, GenerationConfig(max_new_tokens=5, temperature=temperature, top_p=top_p, seed=3,
                                                   eos_token_ids=[]))
    first = spec.generate(prompt, GenerationConfig(max_new_tokens=5, temperature=temperature, top_p=top_p, seed=3,
                                                   eos_token_ids=[]))
    assert again.token_ids == first.token_ids  # a seed reproduces its draw


def test_eos_and_stop_string_inside_an_accepted_draft_block(tiny, tiny_onnx, full_greedy):
    """The backbone as its own draft accepts every draft (rounds of k=4 drafts + the bonus keep
    tokens 1-5, 6-10, ...). An EOS id or a stop string that falls on an accepted draft in the middle
    of round 2 ends the output exactly there, with the right finish reason, and nothing after it is
    streamed: the same result and the same stream as plain decoding."""
    prompt, j = "rivers and seas", 8  # token 8: the third draft of round 2; "I]" = tokens 7-8, first seen there
    greedy = full_greedy[prompt]
    spec = SpeculativeGenerator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer, k=4,
                                draft=OrtBackend(tiny_onnx, threads=1, single_token=True))
    plain = Generator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer)
    text = tiny.tokenizer.decode(greedy[:j + 1])
    stop = text[-2:]
    assert greedy[j] not in greedy[:j] and text.find(stop) == len(text) - 2 and stop.isprintable()
    cases = {"eos": (GenerationConfig(max_new_tokens=40, eos_token_ids=[greedy[j]]), greedy[:j]),
             "stop": (GenerationConfig(max_new_tokens=40, eos_token_ids=[], stop=[stop]), greedy[:j + 1])}
    for reason, (cfg, kept) in cases.items():
        streams = {}
        for name, gen in (("spec", spec), ("plain", plain)):
            streamed = []
            result = gen.generate(prompt, cfg, on_token=lambda t, piece: streamed.append((t, piece)))
            streams[name] = (result.token_ids, result.text, result.finish_reason, streamed)
        tokens, text_out, finish, streamed = streams["spec"]
        assert streams["spec"] == streams["plain"], reason
        assert finish == reason and tokens == kept, reason
        assert spec.stats.accepted == spec.stats.drafted == 8 and spec.stats.rounds == 2, spec.stats
        assert "".join(piece for _, piece in streamed) == text_out
        assert streamed[-1][0] == kept[-1]  # nothing streamed after the end
        if reason == "stop":
            assert text_out == text[:-2] and stop not in text_out


def test_verify_mode_rejects_plain_graph_and_bad_options(tiny, tiny_onnx, tiny_river_int4):
    with pytest.raises(RiverError, match="needs a draft"):
        SpeculativeGenerator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer)
    from types import SimpleNamespace

    two_layers = SimpleNamespace(contract=SimpleNamespace(num_layers=2))  # a draft of another model
    with pytest.raises(RiverError, match="cannot share KV buffers"):
        SpeculativeGenerator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer, draft=two_layers)
    with pytest.raises(ValueError, match="one token of one sequence"):
        draft = OrtBackend(tiny_onnx, threads=1, single_token=True)
        draft.extend(np.asarray([[1, 2]]), draft.new_cache(4))
    with pytest.raises(RiverError, match="gate index 5 out of range"):
        SpeculativeGenerator(OrtBackend(tiny_river_int4, threads=1), tiny.tokenizer, draft_gate=5)


@pytest.mark.slow
def test_smollm2_verify_mode_identical_on_benchmark_prompts(smol, smol_onnx, smol_river_model):
    """Both drafts on the real model: the shipped draft graph (8-bit twins of every layer) on every
    benchmark prompt, the River graph's own exit (int8 river, first gate) on four."""
    from river.runtime.bench.eval_data import EVAL_PROMPTS
    from river.runtime.loading import open_verifier

    river = smol_river_model  # int8 twins, the default gates and draft graph
    full = Generator(OrtBackend(smol_onnx, threads=2), smol.tokenizer, smol.config.eos_token_ids)
    drafts = {"graph": open_verifier(str(river), threads=2, k=4),
              "river": SpeculativeGenerator(OrtBackend(river, threads=2), smol.tokenizer, smol.config.eos_token_ids,
                                            draft_gate=0, k=4)}
    assert drafts["graph"].draft_backend.model_path == river.parent / "draft.onnx"
    counts = {name: [0, 0] for name in drafts}
    for i, prompt in enumerate(EVAL_PROMPTS):
        cfg = GenerationConfig(max_new_tokens=48)
        expected = full.generate(prompt, cfg)
        for name, spec in drafts.items():
            if name == "river" and i >= 4:
                continue
            got = spec.generate(prompt, cfg)
            assert got.token_ids == expected.token_ids, (name, prompt)
            counts[name][0] += spec.stats.accepted
            counts[name][1] += spec.stats.drafted
    for name, (accepted, drafted) in counts.items():
        k = "adaptive k from 4" if drafts[name].adaptive else "k=4"
        print(f"\nSmolLM2 verify mode, {name} draft, {k}: acceptance {accepted / drafted:.1%} over {drafted} drafted tokens")
    assert counts["graph"][0] / counts["graph"][1] > 0.8  # the 8-bit draft agrees with the backbone


def test_export_ships_a_draft_and_the_cli_verifies_with_it(tiny, tiny_onnx, tmp_path, capsys):
    """river-export writes draft.onnx; river-generate --mode verify pairs it with the source step graph
    and prints the full model's greedy text; without the draft and the source it says what to do."""
    import json

    from river import cli as export_cli
    from river.runtime import cli as generate_cli
    from river.runtime.verify_graphs import verify_pair

    out = tmp_path / "r"
    assert export_cli.main([str(tiny_onnx), "-o", str(out), "--gates", "1", "--draft-exit", "0"]) == 0
    manifest = json.loads((out / "river.json").read_text())
    assert manifest["draft"]["file"] == "draft.onnx" and manifest["draft"]["exit_after"] == 0
    backbone, draft = verify_pair(out / "model.onnx")
    assert backbone == tiny_onnx.resolve() and draft == out / "draft.onnx"
    assert verify_pair(out / "model.onnx", 0)[1] == out / "draft.onnx"
    derived = verify_pair(out / "model.onnx", -1)[1]  # another exit: derived from the source, cached
    assert derived != out / "draft.onnx" and derived.is_file()
    assert verify_pair(tiny_onnx)[1] == derived  # a plain step graph gets the same derived draft

    capsys.readouterr()
    assert generate_cli.main(["--model", str(out / "model.onnx"), "--mode", "verify", "--draft-k", "3", "--raw",
                              "--max-new-tokens", "40", "hello there"]) == 0
    captured = capsys.readouterr()
    expected = tiny.tokenizer.decode(Generator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer).generate(
        "hello there", GenerationConfig(max_new_tokens=40), chat=False).token_ids)
    assert captured.out.rstrip("\n") == expected
    assert "acceptance" in captured.err

    (out / "draft.onnx").unlink()
    manifest["source"]["path"] = str(tmp_path / "gone.onnx")
    (out / "river.json").write_text(json.dumps(manifest))
    assert generate_cli.main(["--model", str(out / "model.onnx"), "--mode", "verify", "hi"]) == 2
    assert "re-run river-export" in assert_one_line_error(capsys.readouterr().err, "river-generate")


def test_adaptive_k_rule():
    from river.runtime.speculative import next_k

    assert next_k(4, 4, 4, 8) == 5 and next_k(8, 8, 8, 8) == 8  # all accepted: grow, up to k_max
    assert next_k(4, 4, 1, 8) == 3 and next_k(1, 1, 0, 8) == 1  # fewer than half kept: shrink, not below 1
    assert next_k(4, 4, 2, 8) == 4 and next_k(4, 4, 3, 8) == 4  # half or more but not all: keep
    assert next_k(6, 2, 2, 8) == 7  # a round cut short (room, max_new_tokens) that was all accepted still grows


def test_draft_payoff_runs_the_cheaper_arm_and_re_measures_the_other():
    from river.runtime.speculative import EXPLORE_BACKOFF, DraftPayoff

    payoff = DraftPayoff(explore_tokens=10, window=4, min_rounds=2)
    assert payoff.drafts()  # nothing measured: draft
    payoff.record(True, 0.10, 1)  # an unlucky first round (100 ms a token) does not decide
    assert payoff.drafts()
    payoff.record(True, 0.10, 14)  # 13 ms a token over both
    assert not payoff.drafts()  # plain steps were never measured: one plain round next
    payoff.record(False, 0.02, 1)  # 20 ms a token: drafting pays
    assert payoff.period == 20  # the measure kept the choice: the next one waits twice as long
    chosen = []
    for _ in range(5):
        chosen.append(payoff.drafts())
        payoff.record(chosen[-1], 0.06 if chosen[-1] else 0.02, 6 if chosen[-1] else 1)
    assert chosen == [True, True, True, True, False]  # plain re-measured once 20 tokens went by without it
    assert payoff.period == 40
    for _ in range(6):  # confirmed again and again: the wait stops growing at EXPLORE_BACKOFF times
        payoff.waiting[False] = payoff.period
        payoff.record(payoff.drafts(), 0.02, 1)
    assert payoff.period == EXPLORE_BACKOFF * 10
    payoff.record(True, 0.10, 1)  # one bad round in the window: drafting still pays
    assert payoff.drafts()
    for _ in range(4):  # drafting gets dear (a slow draft): its window fills with dear rounds, until plain is cheaper
        payoff.record(True, 0.30, 6)
        if not payoff.cheaper():
            break
    assert payoff.cost(True) > payoff.cost(False) and not payoff.drafts()
    assert payoff.period == 10  # the choice changed: the other arm is re-measured as often as at first
    chosen = []
    for _ in range(12):
        chosen.append(payoff.drafts())
        payoff.record(chosen[-1], 0.30 if chosen[-1] else 0.02, 6 if chosen[-1] else 1)
    assert chosen.count(True) == 1 and chosen.index(True) == 10, chosen  # drafting re-measured after 10 plain tokens


def test_draft_payoff_can_measure_plain_steps_first():
    """``first=False`` (the batch scheduler beyond ``verify_drafts_up_to`` rows): plain rounds come
    first, drafting is measured once after them, then the cheaper arm runs."""
    from river.runtime.speculative import DraftPayoff

    payoff = DraftPayoff(explore_tokens=20, window=4, min_rounds=2, first=False)
    chosen = []
    for _ in range(5):
        chosen.append(payoff.drafts())
        payoff.record(chosen[-1], 0.03 if chosen[-1] else 0.02, 6 if chosen[-1] else 1)  # drafting: 5 ms a token
    assert chosen == [False, False, True, True, True], chosen


class _Timed:
    """A backend whose steps advance a fake clock by a fixed cost (plus a cost per token of the step)."""

    def __init__(self, backend, clock, cost, per_token=0.0):
        self._backend, self._clock, self._cost, self._per_token = backend, clock, cost, per_token

    def extend(self, token_ids, cache):
        self._clock.now += self._cost + self._per_token * token_ids.shape[1]
        return self._backend.extend(token_ids, cache)

    def __getattr__(self, name):
        return getattr(self._backend, name)


class _Clock:
    now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("draft_cost, plain_wins", [(1.0, True), (0.001, False)])
def test_adaptive_k_drafts_only_while_drafting_pays(tiny, tiny_onnx, tiny_drafts, full_greedy, draft_cost, plain_wins):
    clock = _Clock()
    backbone = _Timed(OrtBackend(tiny_onnx, threads=1), clock, 0.1, per_token=0.01)
    draft = _Timed(OrtBackend(tiny_drafts["e1"], threads=1, single_token=True), clock, draft_cost)
    spec = SpeculativeGenerator(backbone, tiny.tokenizer, draft=draft, k=4, adaptive=True, clock=clock)
    plain = drafting = 0
    for prompt in PROMPTS:
        result = spec.generate(prompt, GenerationConfig(max_new_tokens=40, eos_token_ids=[]))
        assert result.token_ids == full_greedy[prompt], prompt  # exact whichever rounds ran
        plain += spec.stats.plain_rounds
        drafting += spec.stats.accepted + spec.stats.rounds  # tokens the drafting rounds emitted
    assert plain and drafting  # both arms ran: the one in use, and the other re-measured
    if plain_wins:
        assert plain > 4 * drafting, (plain, drafting)
    else:
        assert drafting > 4 * plain, (plain, drafting)
    fixed = SpeculativeGenerator(backbone, tiny.tokenizer, draft=draft, k=4, adaptive=True, clock=clock,
                                 skip_drafting=False)
    fixed.generate(PROMPTS[0], GenerationConfig(max_new_tokens=40, eos_token_ids=[]))
    assert fixed.stats.plain_rounds == 0 and fixed.stats.rounds
