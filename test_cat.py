"""
Tests for stg.py, cat.py and annotate.py. Hermetic: no network, no downloaded weights; models
are built from a config and tokenizers are trained in-process.

    python -m pytest -q test_cat.py
"""
import concurrent.futures
import email.utils
import html
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest

import stg

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# stg.py


@pytest.fixture(scope="module")
def stg_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    stg.write_all(str(out), seed=42)
    return out


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def values(text):
    """{'Smoking': '8', 'Coal Dependency': '14.2', ...} parsed from a question, independently of stg.py."""
    return dict(re.findall(r"([A-Z][A-Za-z ()]*?): (-?\d+(?:\.\d+)?)", text))


def corr(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy)


STG_E_LINKS = [("Yellow fingers", "Smoking"), ("Clothing size", "Weight"), ("Hormones", "Exercise")]


def test_stg_files_and_sizes(stg_data):
    for name, (_, _, n) in stg.FILES.items():
        rows = read(stg_data / name)
        assert len(rows) == n, name
        for row in rows:
            assert list(row) == ["input", "target", "important", "factors"]
            assert row["input"].endswith("Answer: ")


def test_stg_e_iid_rules_hold_exactly(stg_data):
    for name in ["stg_e/train_L.jsonl", "stg_e/test.jsonl"]:
        for row in read(stg_data / name):
            v = {k: int(x) for k, x in values(row["input"]).items()}
            assert len(v) == 8
            assert v["Yellow fingers"] == math.floor(Fraction(3, 2) * v["Smoking"])
            assert v["Clothing size"] == v["Weight"]
            assert v["Hormones"] == math.floor(Fraction(1, 2) * v["Exercise"])
            for k in ["Smoking", "Weight", "Exercise", "Certain gene", "Room size"]:
                assert 1 <= v[k] <= 10


def test_stg_e_label_rule_is_exact(stg_data):
    for name in ["stg_e/train_L.jsonl", "stg_e/test.jsonl", "stg_e/ood.jsonl"]:
        for row in read(stg_data / name):
            v = {k: int(x) for k, x in values(row["input"]).items()}
            score = Fraction(12, 10) * v["Smoking"] + Fraction(7, 10) * v["Weight"] - v["Exercise"]
            assert row["target"] == ("High Risk" if score >= Fraction(72, 10) else "Low Risk")
    assert stg.stg_e_label(1, 10, 1) == "High Risk"  # exactly 7.2, which floats put at 7.1999...
    assert stg.stg_e_label(1, 10, 2) == "Low Risk"


def test_stg_e_spurious_correlation_iid_vs_ood(stg_data):
    for name, lo, hi in [("stg_e/test.jsonl", 0.9, 1.0), ("stg_e/train_L.jsonl", 0.9, 1.0),
                         ("stg_e/ood.jsonl", 0.0, 0.15)]:
        rows = [{k: int(x) for k, x in values(r["input"]).items()} for r in read(stg_data / name)]
        for spurious, cause in STG_E_LINKS:
            r = abs(corr([v[spurious] for v in rows], [v[cause] for v in rows]))
            assert lo <= r <= hi, (name, spurious, r)
        if "ood" in name:
            for spurious, _ in STG_E_LINKS:
                assert {v[spurious] for v in rows} == set(range(1, 11))


def test_stg_e_high_risk_rate_in_band(stg_data):
    # the exact rate over uniform draws is 337/1000; every split must lie within 0.337 +- 0.06
    for name in ["stg_e/train_S.jsonl", "stg_e/train_L.jsonl", "stg_e/test.jsonl", "stg_e/ood.jsonl"]:
        rows = read(stg_data / name)
        rate = sum(r["target"] == "High Risk" for r in rows) / len(rows)
        assert 0.277 <= rate <= 0.397, (name, rate)


def test_stg_order_is_shuffled(stg_data):
    firsts = {re.search(r"cancer\. ([A-Za-z ]+):", r["input"]).group(1) for r in read(stg_data / "stg_e/test.jsonl")}
    assert len(firsts) == 8


def test_stg_spans_occur_in_text(stg_data):
    for name in stg.FILES:
        for row in read(stg_data / name):
            text = row["input"] + str(row["target"])
            for link in row["important"]:
                for effect, causes in link.items():
                    assert effect in text and str(row["target"]) in effect
                    assert causes == row["factors"]["causal"]
                    for cause in causes:
                        assert text.index(cause) + len(cause) <= text.index(effect)
            kinds = row["factors"]
            assert [len(kinds[k]) for k in ("causal", "spurious", "irrelevant")] in ([3, 3, 2], [6, 5, 3])
            for span in sum(kinds.values(), []):
                assert span in row["input"] and re.fullmatch(r"[A-Z][A-Za-z ()]*: -?\d+(\.\d)?(%|st|nd|rd|th|Mbps)?", span)


def test_stg_sizes_are_nested(stg_data):
    big = (stg_data / "stg_e/train_L.jsonl").read_bytes().splitlines()
    assert (stg_data / "stg_e/train_S.jsonl").read_bytes().splitlines() == big[:400]
    assert (stg_data / "stg_e/train_M.jsonl").read_bytes().splitlines() == big[:800]
    assert len(set(big)) > 1500  # not one row repeated


def test_stg_same_seed_same_bytes_other_seed_differs(tmp_path):
    for out, seed in [("a", "42"), ("b", "42"), ("c", "7")]:
        r = subprocess.run([sys.executable, "stg.py", "--out", str(tmp_path / out), "--seed", seed],
                           cwd=HERE, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    for name in stg.FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_stg_h_targets_follow_the_formula(stg_data):
    weights = [Fraction(6, 10), Fraction(5, 10), Fraction(4, 10), Fraction(3, 10), Fraction(-4, 10), Fraction(-6, 10)]
    names = [c[0] for c in stg.STG_H_CAUSES]
    for name in ["stg_h/train.jsonl", "stg_h/test.jsonl", "stg_h/ood.jsonl"]:
        rows = read(stg_data / name)
        for row in rows:
            v = values(row["input"])
            assert len(v) == 14
            aqi = 40 + sum(w * Fraction(v[n]) for w, n in zip(weights, names))
            assert isinstance(row["target"], int) and 0 <= row["target"] <= 100
            assert row["target"] == min(100, max(0, math.floor(aqi + Fraction(1, 2))))
        spread = {r["target"] for r in rows}
        assert len(spread) > 50  # a real regression target, not a handful of values


def test_stg_h_spurious_track_causes_only_in_iid(stg_data):
    iid, ood = read(stg_data / "stg_h/test.jsonl"), read(stg_data / "stg_h/ood.jsonl")
    for spurious, k, *_ in stg.STG_H_SPURIOUS:
        cause = stg.STG_H_CAUSES[k][0]
        pairs = lambda rows: ([float(values(r["input"])[spurious]) for r in rows],
                              [float(values(r["input"])[cause]) for r in rows])
        assert abs(corr(*pairs(iid))) >= 0.6, spurious
        assert abs(corr(*pairs(ood))) <= 0.15, spurious
        # the shortcut breaks, the distribution does not: OOD means stay close to IID means
        mean = lambda xs: sum(xs) / len(xs)
        assert abs(mean(pairs(iid)[0]) - mean(pairs(ood)[0])) < 2


@pytest.mark.parametrize("make_bad", ["file", "under_file", "read_only"])
def test_stg_bad_out_gives_one_line_and_exit_2(tmp_path, make_bad):
    target = tmp_path / "x"
    if make_bad == "file":
        target.write_text("not a folder")
    elif make_bad == "under_file":
        (tmp_path / "f").write_text("")
        target = tmp_path / "f" / "data"
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions")
        target.mkdir()
        target.chmod(0o500)
    r = subprocess.run([sys.executable, "stg.py", "--out", str(target)], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert str(target if make_bad != "under_file" else tmp_path / "f") in r.stderr

# -----------------------------------------------------------------------------
# cat.py

import torch  # noqa: E402

import cat  # noqa: E402


def tiny_args(*flags):
    return cat.resolve(cat.parser.parse_args(["--log-every", "0", *flags]))


@pytest.fixture(scope="module")
def stg_rows():
    return stg.make_split("stg_e", "train", 48, seed=1)


@pytest.fixture(scope="module")
def tiny_tokenizer(stg_rows):
    return cat.train_tokenizer(r["input"] + r["target"] for r in stg_rows)


def random_maps(B, H, L, T, seed=0):
    """L causal softmax maps (B, H, T, T) and the logits they come from (which require grad)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, B, H, T, T, generator=g, requires_grad=True)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    maps = tuple(torch.softmax(logits[l].masked_fill(future, float("-inf")), dim=-1) for l in range(L))
    return logits, maps


def loop_loss(maps, adj, alpha):
    """The Re-Attention loss written row by row, straight from the paper's formulas."""
    B, _, T, _ = maps[0].shape
    avg = sum(m.mean(dim=1) for m in maps) / len(maps)
    total, rows = 0.0, 0
    for b in range(B):
        for i in range(T):
            causal = [avg[b, i, j] for j in range(i + 1) if adj[b, i, j] == 1]
            other = [avg[b, i, j] for j in range(i + 1) if adj[b, i, j] == 0]
            if causal and other:
                ratio = (sum(causal) / len(causal)) / (sum(other) / len(other))
                total = total + torch.clamp(alpha - ratio, min=0)
                rows += 1
    return total / rows if rows else torch.tensor(0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.5, 4.0])
def test_loss_matches_a_row_by_row_loop(alpha):
    B, H, L, T = 3, 2, 3, 7
    logits, maps = random_maps(B, H, L, T)
    g = torch.Generator().manual_seed(1)
    adj = (torch.rand(B, T, T, generator=g) < 0.3).float()  # upper-triangle entries too: they must be ignored
    adj[0, 4, :5] = 1  # a row with no other column: skipped
    adj[1, 5] = 0      # a row with no causal column: skipped
    got = cat.re_attention_loss(maps, adj, alpha)
    want = loop_loss(maps, adj, alpha)
    assert got.shape == () and torch.allclose(got, want, atol=1e-6)
    if alpha > 0.5:
        assert want > 0
        g_got, = torch.autograd.grad(got, logits, retain_graph=True)
        g_want, = torch.autograd.grad(want, logits)
        assert g_want.abs().sum() > 0 and torch.allclose(g_got, g_want, atol=1e-6)


def test_loss_worked_example():
    # one layer, one head, three tokens
    att = torch.tensor([[1.0, 0.0, 0.0],
                        [0.5, 0.5, 0.0],
                        [0.2, 0.3, 0.5]]).view(1, 1, 3, 3)
    adj = torch.zeros(1, 3, 3)
    adj[0, 2, 0] = 1  # row 2: C = 0.2, N = (0.3 + 0.5) / 2 = 0.4, C/N = 0.5
    adj[0, 1, 1] = 1  # row 1: C = 0.5, N = 0.5, C/N = 1
    adj[0, 0, 0] = 1  # row 0: no other column, skipped
    stats = {}
    assert cat.re_attention_loss((att,), adj, 1.0, stats).item() == pytest.approx((0.5 + 0.0) / 2)
    assert stats["ratio"] == pytest.approx((0.5 + 1.0) / 2)
    assert cat.re_attention_loss((att,), adj, 2.0).item() == pytest.approx((1.5 + 1.0) / 2)
    # two identical layers average to the same map
    assert cat.re_attention_loss((att, att), adj, 2.0).item() == pytest.approx(1.25)


def test_loss_is_zero_not_nan_without_supervised_rows():
    for adj in [torch.zeros(2, 5, 5), torch.ones(2, 5, 5).tril()]:  # no causal column / no other column
        logits, maps = random_maps(2, 2, 2, 5)
        loss = cat.re_attention_loss(maps, adj, 3.0)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_adjacency_exact_pairs_with_the_built_in_tokenizer(tiny_tokenizer):
    text = "Smoking: 8, Weight: 4 Answer: High Risk" + tiny_tokenizer.eos_token
    toks = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer(text)["input_ids"])
    assert toks == ["<s>", "<unk>", ":", "▁8", ",", "▁Weight", ":", "▁4", "▁Answer", ":", "▁High", "▁Risk", "</s>"]
    important = [{"High Risk": ["Smoking: 8", "Weight: 4"]}, {"Weight: 4": ["Smoking: 8"]}]
    adj, counts = cat.build_adjacency(tiny_tokenizer, text, important, max_length=64)
    # 'High Risk' is tokens 10-11, so rows 9-10 (shifted up); 'Smoking: 8' is tokens 1-3, 'Weight: 4' tokens 5-7;
    # 'Weight: 4' as an effect is tokens 5-7, rows 4-6, caused by tokens 1-3
    want = {(i, j) for i in (9, 10) for j in (1, 2, 3, 5, 6, 7)} | {(i, j) for i in (4, 5, 6) for j in (1, 2, 3)}
    assert adj.shape == (13, 13)
    assert {tuple(p) for p in adj.nonzero().tolist()} == want
    assert counts == {"found": 3, "missing": 0, "truncated": 0}


def test_adjacency_counts_missing_and_truncated(tiny_tokenizer):
    text = "Smoking: 8, Weight: 4 Answer: High Risk" + tiny_tokenizer.eos_token
    important = [{"High Risk": ["Smoking: 8", "Exercise: 2"]},  # found; not in the text
                 {"Smoking: 8": ["Weight: 4"]},                 # the cause comes after the effect: missing
                 {"Weight: 4": ["Smoking: 8"]},                 # found
                 {"High Risk": ["Smoking: 8"]}]                 # the same pair again: counted once
    adj, counts = cat.build_adjacency(tiny_tokenizer, text, important, max_length=64)
    assert counts == {"found": 2, "missing": 2, "truncated": 0}
    adj, counts = cat.build_adjacency(tiny_tokenizer, text, important, max_length=8)  # cuts 'High Risk'
    assert adj.shape == (8, 8) and counts == {"found": 1, "missing": 2, "truncated": 1}
    assert {tuple(p) for p in adj.nonzero().tolist()} == {(i, j) for i in (4, 5, 6) for j in (1, 2, 3)}


def bpe_tokenizer(style, texts):
    """Tokenizers trained in-process in the styles of Llama (SentencePiece BPE: '▁' for spaces, byte
    fallback) and of Qwen / Llama-3 (byte-level BPE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    special = ["<s>", "</s>", "<unk>"]
    if style == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Metaspace("▁", prepend_scheme="first"), decoders.ByteFallback()])
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    if style != "llama":
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), tok.post_processor])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("style", ["built-in", "llama", "byte-level"])
def test_adjacency_selects_whole_spans_for_every_tokenizer_style(style, stg_rows, tiny_tokenizer):
    texts = [r["input"] + r["target"] for r in stg_rows]
    tok = tiny_tokenizer if style == "built-in" else bpe_tokenizer(style, texts)
    row = stg_rows[0]
    text = row["input"] + row["target"] + tok.eos_token
    enc = tok(text, return_offsets_mapping=True)
    pieces = [text[a:b] for a, b in enc["offset_mapping"]]
    adj, counts = cat.build_adjacency(tok, text, row["important"], max_length=512)
    assert counts == {"found": 3, "missing": 0, "truncated": 0}
    rows = sorted({i for i, _ in adj.nonzero().tolist()})
    # the rows, shifted down by one, spell the effect; the columns of each row spell the three causes
    assert "".join(pieces[i + 1] for i in rows).strip() == row["target"]
    for i in rows:
        cols = adj[i].nonzero().flatten().tolist()
        spelled = "".join(pieces[j] if j - 1 in cols else "|" + pieces[j] for j in cols)
        groups = sorted(s.strip() for s in spelled.split("|") if s)
        causes = sorted(row["important"][0][row["target"]])
        # whole spans, give or take a comma that a BPE merge glued onto the last token
        assert len(groups) == 3 and all(c in g and len(g) <= len(c) + 1 for g, c in zip(groups, causes)), groups
    assert torch.equal(adj, adj.tril())


def test_read_jsonl_names_file_line_and_field(tmp_path):
    good = json.dumps({"input": "a", "target": "b", "important": [{"b": ["a"]}]})
    cases = [("not valid JSON", "{oops"), ("missing field 'input'", '{"target": "x"}'), ("missing field 'input'", "[1, 2]"),
             ("missing field 'target'", '{"input": "x"}'), ("missing field 'important'", '{"input": "x", "target": "y"}'),
             ("field 'important'", '{"input": "x", "target": "y", "important": {"y": "x"}}'),
             ("field 'important'", '{"input": "x", "target": "y", "important": [{"y": "x"}]}'),
             ("field 'input' must be a string", '{"input": 3, "target": "y", "important": []}')]
    for message, bad in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n" + good + "\n" + bad + "\n")
        with pytest.raises(cat.BadInput, match=re.escape(f"{path}:3: {message}")):
            cat.read_jsonl(str(path), need_important=True)
    path.write_text(good + "\n" + '{"input": "x", "target": 3}\n')
    assert len(cat.read_jsonl(str(path))) == 2  # test rows may lack 'important'


def test_padding_does_not_change_a_samples_losses(stg_rows):
    args = tiny_args("--train", "unused")
    model, tok = cat.load_model(args, stg_rows, torch.device("cpu"), None)
    model.eval()
    short = dict(stg_rows[0], input="Smoking: 3, Weight: 9, Exercise: 1 Answer: ", target="High Risk",
                 important=[{"High Risk": ["Smoking: 3", "Weight: 9", "Exercise: 1"]}])
    a, _ = cat.encode(tok, short, 256)
    b, _ = cat.encode(tok, stg_rows[1], 256)
    assert len(a["ids"]) < len(b["ids"])

    def losses(examples):
        ids, mask, labels, adj = cat.collate(examples, tok.pad_token_id)
        adj[1:] = 0  # supervise only the first sample
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        nll = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
        return nll, cat.re_attention_loss(out.attentions, adj, 5.0)

    alone, batched = losses([a]), losses([a, b])
    assert alone[1] > 0
    assert torch.allclose(alone[0], batched[0], atol=1e-5) and torch.allclose(alone[1], batched[1], atol=1e-5)


def mean_ratio(model, data, pad_id):
    ids, mask, labels, adj = cat.collate(data, pad_id)
    stats = {}
    with torch.no_grad():
        cat.re_attention_loss(model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions, adj, 1.0, stats)
    return stats["ratio"]


def test_training_with_alpha_raises_the_causal_ratio(stg_rows):
    after = {}
    for alpha in ["0", "8"]:
        args = tiny_args("--alpha", alpha, "--epochs", "4", "--batch-size", "8", "--lr", "3e-3")
        torch.manual_seed(0)
        model, tok = cat.load_model(args, stg_rows[:16], torch.device("cpu"), None)
        data = [cat.encode(tok, r, 256)[0] for r in stg_rows[:16]]
        before = mean_ratio(model, data, tok.pad_token_id)
        cat.train(model, data, args, tok.pad_token_id, torch.device("cpu"), None)
        after[alpha] = mean_ratio(model, data, tok.pad_token_id)
    assert 0.8 < before < 1.25           # random init: attention is close to uniform
    assert after["8"] > 2 * before and after["8"] > 1.5 * after["0"]


def test_attention_maps_must_require_grad(stg_rows):
    from transformers import AutoModelForCausalLM, LlamaConfig
    args = tiny_args("--epochs", "1", "--batch-size", "8")
    _, tok = cat.load_model(args, stg_rows, torch.device("cpu"), None)
    data = [cat.encode(tok, r, 256)[0] for r in stg_rows[:8]]
    sdpa = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), **cat.TINY), attn_implementation="sdpa")
    with pytest.raises(AssertionError, match="one attention map per layer"):
        cat.train(sdpa, data, args, tok.pad_token_id, torch.device("cpu"), None)
    checkpointed = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), **cat.TINY), attn_implementation="eager")
    checkpointed.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(AssertionError, match="requires grad"):
        cat.train(checkpointed, data, args, tok.pad_token_id, torch.device("cpu"), None)


def test_lora_changes_only_adapter_weights(stg_rows):
    args = tiny_args("--lora", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2")
    assert {"q_proj", "k_proj"} <= set(args.lora_targets.split(","))
    model, tok = cat.load_model(args, stg_rows, torch.device("cpu"), None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [cat.encode(tok, r, 256)[0] for r in stg_rows[:16]]
    cat.train(model, data, args, tok.pad_token_id, torch.device("cpu"), None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    lora = {k for k in before if "lora_" in k}
    assert lora and changed and changed <= lora
    assert any(".k_proj.lora_" in k for k in changed) and any(".q_proj.lora_" in k for k in changed)


def run_cat(*flags, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "cat.py"), "--log-every", "0", *flags],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cat_end_to_end_writes_metrics_and_reloads(tmp_path):
    for name, split, n in [("train", "train", 48), ("test", "test", 16), ("ood", "ood", 16)]:
        stg.write_jsonl(tmp_path / f"{name}.jsonl", stg.make_split("stg_e", split, n))
    files = ["--train", "train.jsonl", "--test", "test.jsonl", "--ood", "ood.jsonl"]
    r = run_cat(*files, "--epochs", "2", "--out", "run1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "run1/metrics.json").read_text())
    assert set(metrics) == {"iid", "ood", "links", "config"}
    for split in ("iid", "ood"):
        assert 0 <= metrics[split]["accuracy"] <= 1
        shares = metrics[split]["attention"]
        assert set(shares) == {"causal", "spurious", "irrelevant"} and 0 < sum(shares.values()) <= 1
    assert metrics["links"] == {"found": 48 * 3, "missing": 0, "truncated": 0}
    assert metrics["config"]["alpha"] == cat.DEFAULTS["tiny"]["alpha"] and metrics["config"]["epochs"] == 2
    assert (tmp_path / "run1/config.json").exists() and (tmp_path / "run1/tokenizer.json").exists()
    # the saved folder loads back through from_pretrained, as any local model does
    r = run_cat(*files, "--model", "run1", "--epochs", "1", "--ood", "", "--out", "run2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert set(json.loads((tmp_path / "run2/metrics.json").read_text())) == {"iid", "links", "config"}


@pytest.mark.parametrize("case", ["empty", "bad_json", "missing", "out_is_a_file"])
def test_cat_bad_input_is_one_clear_line(tmp_path, case):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"input": "a", "target": "b", "important": []}\nnot json\n')
    stg.write_jsonl(tmp_path / "good.jsonl", stg.make_split("stg_e", "train", 8))
    flags = {"empty": ["--train", "empty.jsonl"], "bad_json": ["--train", "bad.jsonl"], "missing": ["--train", "no.jsonl"],
             "out_is_a_file": ["--train", "good.jsonl", "--out", "good.jsonl"]}[case]
    r = run_cat(*flags, "--test", "", "--ood", "", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    want = {"empty": "empty.jsonl: 0 rows", "bad_json": "bad.jsonl:2: not valid JSON",
            "missing": "No such file or directory: 'no.jsonl'", "out_is_a_file": "File exists: 'good.jsonl'"}[case]
    assert last.startswith("cat.py: error:") and want in last
    assert "model:" not in r.stdout  # failed before any model was built


def test_cat_unloadable_model_gives_the_loaders_reason(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"input": "a", "target": "b", "important": []}) + "\n")
    r = run_cat("--train", "t.jsonl", "--test", "", "--ood", "", "--model", str(tmp_path / "nope"), cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert re.match(r"cat\.py: error: cannot load --model .*nope: \S", r.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("prediction, target, ok", [
    (" High Risk", "High Risk", True), (" Low Risk Low Risk", "High Risk", False), ("", "Low Risk", False),
    ("35", 35, True), (" 35 Answer: 36", 35, True), ("36", 35, False),
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", "#### 72", True),
    ("She sold 48 + 24 = 72 clips. #### 1,072", "Natalia ... #### 1072", True),
    ("#### 71", "#### 72", False),
    ("Answer: 84", "Answer: 84.0", True), ("84.0", "Answer: 84.0", True), ("0.875", "Answer: 0.875", True),
    ("Answer: 85.0", "Answer: 84.0", False), ("6 bags", "6 (bags)", True), ("-3.5", "-3.5", True),
    ("B", "B", True), (" B. a bacterial population", "B", True), ("Answer: C", "B", False), ("Answer", "B", False),
])
def test_answer_checkers(prediction, target, ok):
    assert cat.is_correct(prediction, target) == ok

# -----------------------------------------------------------------------------
# annotate.py, against a real HTTP server on 127.0.0.1 playing an OpenAI-compatible endpoint

import http.server  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import annotate  # noqa: E402

TEMPLATE = "Mark the causes. JSON please.\n<<{text}>>\n"
GOOD = {"has 7": ["Tom"], "Answer: 7": ["has 7"]}


class Endpoint:
    """A chat-completions server in a thread. The word after 'row N' in a row's text picks the behaviour;
    every request is logged as (time, text, attempt, body)."""

    def __init__(self, delay=0.0, status=None):
        self.log, self.attempts, self.delay, self.status, self.lock = [], Counter(), delay, status, threading.Lock()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = re.search(r"<<(.*)>>", body["messages"][0]["content"], re.S)
                text = text.group(1) if text else body["messages"][0]["content"]
                with endpoint.lock:
                    endpoint.attempts[text] += 1
                    attempt = endpoint.attempts[text]
                    endpoint.log.append((time.time(), text, attempt, body, dict(self.headers)))
                status, content, headers = endpoint.behave(text, attempt, self.headers.get("Authorization", ""))
                if status == 200:
                    content = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                                          "usage": {"prompt_tokens": 100, "completion_tokens": 20}})
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(content.encode())))
                    self.end_headers()
                    self.wfile.write(content.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def behave(self, text, attempt, auth):
        time.sleep(self.delay)
        if self.status:
            return self.status, json.dumps({"error": {"message": f"bad key {auth}"}}), {}
        kind = re.search(r"row \d+ (\w+)", text).group(1)
        if kind == "fenced":
            return 200, "Here are the links:\n```json\n" + json.dumps(GOOD) + "\n```\nHope this helps.", {}
        if kind == "badjson":
            return 200, "Tom has apples, I think.", {}
        if kind == "absent":  # 'Mary' is not in the text, nor is the effect 'Zorro' (with its one cause)
            return 200, json.dumps({"has 7": ["Tom", "Mary"], "Zorro": ["Tom"], "Answer: 7": ["has 7"]}), {}
        if kind == "nolink":
            return 200, json.dumps({"Zorro": ["Mary"]}), {}
        if kind == "rate" and attempt == 1:
            return 429, '{"error": {"message": "slow down"}}', {"Retry-After": "1"}
        if kind == "ratems" and attempt == 1:
            return 429, '{"error": {"message": "slow down"}}', {"retry-after-ms": "300"}
        if (kind == "err500" and attempt <= 2) or kind == "always500":
            return 500, f'{{"error": {{"message": "overloaded, your key {auth}"}}}}', {}
        if kind == "slow" and attempt == 1:
            time.sleep(1.5)
        if kind == "bad400":
            return 400, f'{{"error": {{"message": "context too long for key {auth}"}}}}', {}
        return 200, json.dumps(GOOD), {}

    def close(self):
        self.server.shutdown()


def raw_rows(kinds):
    return [{"input": f"row {n} {kind}: Tom has 7 apples. How many apples? ", "target": "Answer: 7", "id": n}
            for n, kind in enumerate(kinds)]


@pytest.fixture
def endpoint():
    servers = []

    def make(**kw):
        servers.append(Endpoint(**kw))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def annotate_args(tmp_path, url, *flags):
    (tmp_path / "t.txt").write_text(TEMPLATE)
    return ["--prompt", str(tmp_path / "t.txt"), "--input", str(tmp_path / "raw.jsonl"),
            "--output", str(tmp_path / "out.jsonl"), "--base-url", url, "--model", "m", *flags]


def test_annotate_handles_every_kind_of_reply(tmp_path, endpoint, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-123")
    kinds = ["good", "fenced", "badjson", "absent", "nolink", "rate", "ratems", "err500", "always500", "slow", "bad400", "good"]
    rows = raw_rows(kinds)
    stg.write_jsonl(tmp_path / "raw.jsonl", rows)
    server = endpoint()
    tally = annotate.main(annotate_args(tmp_path, server.url, "--workers", "4", "--timeout", "0.5",
                                        "--retries", "3", "--backoff", "0.05"))
    out, failed = read(tmp_path / "out.jsonl"), read(tmp_path / "out.failed.jsonl")
    ok = [k for k in kinds if k not in ("badjson", "nolink", "always500", "bad400")]
    assert [r["input"].split(":")[0] for r in out] == [r["input"].split(":")[0] for r in rows if r["input"].split()[2].rstrip(":") in ok]
    for r in out:  # each row unchanged, plus `important`
        assert {k: v for k, v in r.items() if k != "important"} == rows[r["id"]]
        assert r["important"] == [{"has 7": ["Tom"]}, {"Answer: 7": ["has 7"]}]
    reasons = {f["row"]["input"].split()[2].rstrip(":"): f["reason"] for f in failed}
    assert set(reasons) == {"badjson", "nolink", "always500", "bad400"}
    assert "not JSON" in reasons["badjson"] and "no usable link" in reasons["nolink"]
    assert "gave up after 3 attempts: HTTP 500" in reasons["always500"] and "HTTP 400: " in reasons["bad400"]
    assert all(f["line"] == f["row"]["id"] + 1 for f in failed)
    attempts = {text.split()[2].rstrip(":"): n for text, n in server.attempts.items()}
    assert attempts["bad400"] == 1 and attempts["always500"] == 3 and attempts["err500"] == 3
    assert attempts["slow"] == 2 and attempts["rate"] == 2 and attempts["good"] == 1
    times = {k: [t for t, text, *_ in server.log if f" {k}:" in text] for k in ("rate", "ratems")}
    assert times["rate"][1] - times["rate"][0] >= 0.95            # Retry-After: 1 (seconds)
    assert 0.28 <= times["ratems"][1] - times["ratems"][0] < 0.9  # retry-after-ms: 300
    assert tally["ok"] == 8 and tally["failed"] == 4 and tally["dropped"] == 3 and tally["prompt"] == 800
    summary = capsys.readouterr().out
    assert "rows 12 | ok 8" in summary and "failed 4" in summary and "spans dropped 3" in summary
    # JSON mode by default; the key travels in the header only, and is never written or printed
    assert all(body["response_format"] == {"type": "json_object"} for *_, body, _ in server.log)
    assert server.log[0][4]["Authorization"] == "Bearer sk-test-SECRET-123"
    for path in tmp_path.iterdir():
        assert "SECRET" not in path.read_text()
    assert "SECRET" not in summary


def test_annotate_resumes_after_kill_9(tmp_path, endpoint):
    rows = raw_rows(["good"] * 60)
    stg.write_jsonl(tmp_path / "raw.jsonl", rows)
    server = endpoint(delay=0.05)
    cmd = [sys.executable, os.path.join(HERE, "annotate.py"), *annotate_args(tmp_path, server.url, "--workers", "3")]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.02)
    first.kill()  # SIGKILL: no cleanup at all
    first.wait()
    saved = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert 20 <= len(saved) < 60
    with open(out, "a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"input": "row 59 good: Tom has')
    asked_before = len(server.log)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"{len(saved)} saved by an earlier run" in second.stdout
    final = read(out)
    assert [r["id"] for r in final] == list(range(60))            # every row once, in input order
    asked_again = [int(text.split()[1]) for _, text, *_ in server.log[asked_before:]]
    assert not set(asked_again) & set(saved)                     # no saved row asked again
    assert sorted(asked_again) == sorted(set(range(60)) - set(saved))
    assert not (tmp_path / "out.failed.jsonl").exists()


def test_annotate_401_stops_at_once(tmp_path, endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-401")
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(["good"] * 30))
    server = endpoint(status=401)
    cmd = [sys.executable, os.path.join(HERE, "annotate.py"), *annotate_args(tmp_path, server.url, "--workers", "2")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("annotate.py: error:") and "HTTP 401" in last and "bad key" in last
    assert "SECRET" not in r.stderr + r.stdout
    assert len(server.log) <= 2  # one per worker at most, not one per row


def test_annotate_bad_input_fails_before_any_request(tmp_path, endpoint):
    server = endpoint()
    for bad, message in [('{"input": "a", "target": "b"}\n{oops\n', "raw.jsonl:2: not valid JSON"),
                         ('{"target": "b"}\n', "raw.jsonl:1: missing field 'input'")]:
        (tmp_path / "raw.jsonl").write_text(bad)
        with pytest.raises(annotate.Fatal, match=re.escape(message)):
            annotate.main(annotate_args(tmp_path, server.url))
    assert server.log == []
    with pytest.raises(annotate.Fatal, match="known tasks: arc_e, asdiv, generic, gsm8k, mawps, svamp"):
        annotate.main(["--task", "gsm9k", "--input", "x", "--output", "y"])
    r = subprocess.run([sys.executable, os.path.join(HERE, "annotate.py"), "--task", "gsm8k", "--input", "no.jsonl",
                        "--output", "y.jsonl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["annotate.py: error: [Errno 2] No such file or directory: 'no.jsonl'"]


def test_annotate_task_prompt_and_no_json_mode(tmp_path, endpoint):
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(["good"]))
    server = endpoint()
    annotate.main(["--task", "mawps", "--no-json-mode", "--input", str(tmp_path / "raw.jsonl"),
                   "--output", str(tmp_path / "out.jsonl"), "--base-url", server.url])
    body = server.log[0][3]
    assert "response_format" not in body and body["temperature"] == 0 and body["model"] == "gpt-4o-mini"
    prompt = body["messages"][0]["content"]
    assert "row 0 good: Tom has 7 apples. How many apples? Answer: 7" in prompt and "{text}" not in prompt


@pytest.mark.parametrize("task", annotate.TASKS)
def test_prompt_examples_are_valid_annotations(task):
    template = open(os.path.join(HERE, "prompts", task + ".txt"), encoding="utf-8").read()
    assert template.count("{text}") == 1
    example = re.search(r"##example\n(.*?)\n\n##output\n", template, re.S).group(1)
    links = json.loads(re.search(r"##output\n(\{.*?\})\n", template, re.S).group(1))
    assert len(links) >= 3
    for effect, causes in links.items():
        assert effect in example and causes
        for cause in causes:  # every span is copied exactly, and some occurrence of the cause comes first
            assert cause in example and example.index(cause) + len(cause) <= example.rindex(effect), (effect, cause)
    assert re.search(r"answer", template, re.I) and "JSON" in template


def test_retry_after_forms():
    assert annotate.retry_after({"Retry-After": "7"}) == 7.0
    assert annotate.retry_after({"retry-after-ms": "250", "Retry-After": "7"}) == 0.25
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 <= annotate.retry_after({"Retry-After": soon}) <= 31
    assert annotate.retry_after({}) is None

# -----------------------------------------------------------------------------
# benchmarks: skipped unless asked for by name, `python -m pytest -s -k bench test_cat.py`; they print figures

bench = pytest.mark.skipif("'bench' not in config.option.keyword", reason="benchmark: run with -k bench")

STEP_PROBE = r"""
import json, resource, sys, time, torch
here, shape, variant, steps = json.loads(sys.argv[1])
sys.path.insert(0, here)
import cat
from transformers import AutoModelForCausalLM, LlamaConfig
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
amp = torch.bfloat16 if device.type == "cuda" else None
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(LlamaConfig(**shape["config"]), attn_implementation="eager").to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
B, T = shape["batch"], shape["tokens"]
ids = torch.randint(4, shape["config"]["vocab_size"], (B, T), device=device)
adj = torch.zeros(B, T, T, device=device)
adj[:, T - 4:, 1:T // 4] = 1  # the last rows are caused by the first quarter of the text
statm = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
base = statm() if device.type == "cpu" else torch.cuda.memory_allocated()
times = []
for step in range(steps):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        out = model(input_ids=ids, output_attentions=variant == "cat")
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    if variant == "cat":
        loss = loss + cat.re_attention_loss(out.attentions, adj, 3.0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del out, loss
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if device.type == "cpu" else torch.cuda.max_memory_allocated()) - base
times = sorted(times[2:])
print(json.dumps({"ms": 1000 * times[len(times) // 2], "peak_mb": peak / 2**20, "tokens": B * T, "device": str(device)}))
"""

STEP_SHAPES = {  # the built-in model on an STG_E batch, and a TinyLlama-1.1B-shaped model cut down to fit a CPU
    "built-in, B=32 T=58": dict(batch=32, tokens=58, config=dict(vocab_size=64, **cat.TINY)),
    "TinyLlama-shaped 1/4 depth+width, B=4 T=256": dict(batch=4, tokens=256, config=dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=2048)),
}
if torch.cuda.is_available():
    STEP_SHAPES["TinyLlama-1.1B, bf16, B=8 T=256"] = dict(batch=8, tokens=256, config=dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048))


@bench
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_bench_cat_step_costs_little_more_than_vanilla(shape):
    """A CAT step (attention maps out, Re-Attention loss) against a plain eager step: time <= 1.15x, memory <= 1.10x.
    Each variant runs in its own process, so peak memory is its own (RSS on CPU, allocator peak on CUDA)."""
    runs = {}
    for variant in ("vanilla", "cat"):
        probe = json.dumps([HERE, STEP_SHAPES[shape], variant, 10])
        r = subprocess.run([sys.executable, "-c", STEP_PROBE, probe], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        runs[variant] = json.loads(r.stdout.strip().splitlines()[-1])
    v, c = runs["vanilla"], runs["cat"]
    print(f"\n{shape} on {v['device']}: vanilla {v['ms']:.1f} ms/step ({1000 * v['tokens'] / v['ms']:.0f} tokens/s), "
          f"peak {v['peak_mb']:.0f} MB | CAT {c['ms']:.1f} ms/step ({1000 * c['tokens'] / c['ms']:.0f} tokens/s), "
          f"peak {c['peak_mb']:.0f} MB | time x{c['ms'] / v['ms']:.3f}, memory x{c['peak_mb'] / v['peak_mb']:.3f}")
    assert c["ms"] <= 1.15 * v["ms"] and c["peak_mb"] <= 1.10 * v["peak_mb"]


@bench
def test_bench_annotate_throughput_scales_with_workers(tmp_path, endpoint):
    """Against a server that answers in 200 ms, 8 workers must do at least 6x the rows per second of one."""
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(["good"] * 48))
    server, rate = endpoint(delay=0.2), {}
    for workers in (1, 8):
        (tmp_path / "out.jsonl").unlink(missing_ok=True)
        t0 = time.time()
        annotate.main(annotate_args(tmp_path, server.url, "--workers", str(workers)))
        rate[workers] = 48 / (time.time() - t0)
        assert len(read(tmp_path / "out.jsonl")) == 48
    print(f"\nannotate, 48 rows at 200 ms a reply: 1 worker {rate[1]:.1f} rows/s, 8 workers {rate[8]:.1f} rows/s, "
          f"x{rate[8] / rate[1]:.2f}")
    assert rate[8] >= 6 * rate[1]


@bench
def test_bench_default_run_finishes_in_5_minutes(tmp_path):
    t0 = time.time()
    r = run_cat("--out", str(tmp_path / "out"), cwd=HERE)
    wall = time.time() - t0
    assert r.returncode == 0, r.stderr
    print(f"\n`python cat.py` (defaults) on {os.cpu_count()} CPU cores: {wall:.0f} s\n" + r.stdout[-400:])
    assert wall <= 300


def run_many(jobs, cwd):
    """Run `python cat.py` for every (out, flags) job, one single-threaded process per CPU core."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def one(job):
        out, flags = job
        r = subprocess.run([sys.executable, os.path.join(HERE, "cat.py"), "--log-every", "0", "--out", out, *flags],
                           cwd=cwd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        with open(os.path.join(cwd, out, "metrics.json")) as f:
            return json.load(f)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(one, jobs))


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))


def attention_html(columns, path):
    """One self-contained page: for each example, the question's tokens coloured by the answer row's averaged
    attention (darker = more; the first token, an attention sink, is left out of the scale), one column per model.
    Causal spans are underlined green, spurious ones orange."""
    css = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
           "td{vertical-align:top;padding:.6em;border-top:1px solid #ccc;width:50%;line-height:1.9}"
           "span{padding:1px 2px;border-radius:3px}.causal{border-bottom:3px solid #1a7f37}"
           ".spurious{border-bottom:3px solid #d4760a}.irrelevant{border-bottom:3px dotted #888}")
    names = list(columns)
    rows = [f"<tr><th>{n}</th>" + "".join(f"<th>{m}</th>" for m in names) + "</tr>" for n in ["split"]]
    for split in ("iid", "ood"):
        for k in range(len(columns[names[0]][split])):
            cells = []
            for m in names:
                ex = columns[m][split][k]
                top = max(ex["weights"][1:]) or 1.0
                spans = "".join(
                    f'<span class="{kind or ""}" style="background:rgba(220,38,38,{min(1.0, w / top):.2f})" '
                    f'title="{w:.4f}">{html.escape(tok.replace("▁", " "))}</span>'
                    for tok, w, kind in zip(ex["tokens"], ex["weights"], ex["kinds"]))
                mark = "right" if cat.is_correct(ex["prediction"], ex["target"]) else "wrong"
                cells.append(f"<td>{spans}<br><b>answer:</b> {html.escape(ex['prediction'].strip())} ({mark}; "
                             f"target {html.escape(str(ex['target']))})</td>")
            rows.append(f"<tr><th>{split.upper()} {k + 1}</th>{''.join(cells)}</tr>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>CAT: where the answer looks</title>"
            f"<style>{css}</style></head><body><h1>Where the answer looks: {' vs '.join(names)}</h1>"
            "<p>Each token is shaded by the attention it gets from the answer row (the last prompt token, which "
            "predicts the answer), averaged over all layers and heads. Underlined: <span class='causal'>causal</span>, "
            "<span class='spurious'>spurious</span>, <span class='irrelevant'>irrelevant</span> attributes. "
            f"In the OOD rows the spurious values no longer follow their causes.</p><table>{''.join(rows)}</table>"
            "</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


@bench
def test_bench_stg_table_vanilla_vs_cat():
    """Vanilla and CAT on STG_S, STG_M and STG_L over 3 seeds with the built-in model's defaults; prints the
    table and writes out/attention.html. Targets (means over sizes and seeds): CAT OOD >= vanilla OOD + 7.6,
    CAT IID >= vanilla IID - 1, vanilla IID >= 90% on STG_L."""
    t0, seeds = time.time(), [42, 43, 44]
    stg.write_all(os.path.join(HERE, "data"))
    jobs = [(f"out/stg_table/{method}_{size}_{seed}", ["--train", f"data/stg_e/train_{size}.jsonl", "--seed", str(seed)]
             + (["--alpha", "0"] if method == "vanilla" else []))
            for size in "LMS" for seed in seeds for method in ("vanilla", "CAT")]
    results = dict(zip([j[0] for j in jobs], run_many(jobs, HERE)))
    get = lambda method, size, split, key: [results[f"out/stg_table/{method}_{size}_{s}"][split][key] for s in seeds]
    lines = ["| train | method | IID accuracy | OOD accuracy | IID answer-row attention: causal / spurious / irrelevant |",
             "|---|---|---|---|---|"]
    avg = {}
    for size in "SML":
        for method in ("vanilla", "CAT"):
            iid, ood = mean_std(get(method, size, "iid", "accuracy")), mean_std(get(method, size, "ood", "accuracy"))
            att = [mean_std([a[k] for a in get(method, size, "iid", "attention")])[0] for k in ("causal", "spurious", "irrelevant")]
            avg.setdefault(method, []).append((iid[0], ood[0]))
            lines.append(f"| STG_{size} | {method} | {100 * iid[0]:.1f} ± {100 * iid[1]:.1f} | {100 * ood[0]:.1f} ± "
                         f"{100 * ood[1]:.1f} | {' / '.join(f'{x:.3f}' for x in att)} |")
    mean = {m: [100 * sum(v[k] for v in avg[m]) / 3 for k in (0, 1)] for m in avg}
    lines.append(f"| mean | vanilla | {mean['vanilla'][0]:.1f} | {mean['vanilla'][1]:.1f} | |")
    lines.append(f"| mean | CAT | {mean['CAT'][0]:.1f} | {mean['CAT'][1]:.1f} | |")
    cfg = results[jobs[1][0]]["config"]
    attention_html({"vanilla": json.load(open(os.path.join(HERE, "out/stg_table/vanilla_L_42/attention.json"))),
                    f"CAT (alpha {cfg['alpha']:g})": json.load(open(os.path.join(HERE, "out/stg_table/CAT_L_42/attention.json")))},
                   os.path.join(HERE, "out/attention.html"))
    print(f"\n{time.strftime('%Y-%m-%d')}, seeds {seeds}, {len(jobs)} runs in {(time.time() - t0) / 60:.1f} min on "
          f"{os.cpu_count()} CPU cores; CAT: alpha {cfg['alpha']:g}, gamma {'exp(-epoch)' if cfg['gamma_decay'] else '1'}, "
          f"{cfg['epochs']} epochs, lr {cfg['lr']:g}, batch {cfg['batch_size']}\n" + "\n".join(lines)
          + "\nwrote out/attention.html")
    targets = {"CAT OOD >= vanilla OOD + 7.6": mean["CAT"][1] - mean["vanilla"][1] >= 7.6,
               "CAT IID >= vanilla IID - 1": mean["CAT"][0] - mean["vanilla"][0] >= -1,
               "vanilla IID >= 90 on STG_L": 100 * mean_std(get("vanilla", "L", "iid", "accuracy"))[0] >= 90}
    print("\n".join(f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in targets.items()))
    assert all(targets.values())


@bench
def test_bench_alpha_grid_on_validation():
    """Choose the built-in model's alpha on a validation split cut from STG_L's training rows (the last 200),
    never on the test sets: the default must be the grid's best."""
    grid = [0.0, 1.0, 1.5, 2.0, 3.0, 5.0]
    stg.write_all(os.path.join(HERE, "data"))
    jobs = [(f"out/alpha_grid/alpha_{a:g}", ["--train", "data/stg_e/train_L.jsonl", "--val", "200", "--alpha", str(a),
                                            "--test", "", "--ood", ""]) for a in grid]
    val = {a: m["val"]["accuracy"] for a, m in zip(grid, run_many(jobs, HERE))}
    print("\nalpha grid, validation accuracy (200 rows held out of STG_L): "
          + ", ".join(f"{a:g}: {100 * v:.1f}%" for a, v in val.items()))
    assert cat.DEFAULTS["tiny"]["alpha"] == max(val, key=val.get)


def repaired(row):
    """An STG_E OOD row with its spurious values put back in line with their causes, as in training."""
    v = {name: int(x) for name, x in re.findall(r"([A-Z][a-z ]+): (\d+)", row["input"])}
    fixed = {"Yellow fingers": 3 * v["Smoking"] // 2, "Clothing size": v["Weight"], "Hormones": v["Exercise"] // 2}
    text = row["input"]
    for name, x in fixed.items():
        text = re.sub(rf"{name}: \d+", f"{name}: {x}", text)
    return {"input": text, "target": row["target"]}  # its `factors` no longer match the text


@bench
def test_bench_stg_why_the_ood_gain_is_small():
    """Reads the STG_L models of bench_stg_table (run it first): the answer row's attention share on each kind of
    attribute, layer by layer, on the OOD test; and OOD accuracy with the spurious values repaired. A model that
    reads only the causes scores the same on both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ood = cat.read_jsonl(os.path.join(HERE, "data/stg_e/ood.jsonl"))
    args = cat.resolve(cat.parser.parse_args(["--max-new-tokens", "4"]))
    lines, gaps = [], {}
    for run in [f"{method}_L_{seed}" for method in ("vanilla", "CAT") for seed in (42, 43, 44)]:
        folder = os.path.join(HERE, "out/stg_table", run)
        assert os.path.isdir(folder), "run `python -m pytest -s -k bench_stg_table test_cat.py` first"
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(folder)
        acc = [cat.evaluate(model, tok, rows, args, torch.device("cpu"), None)[0]["accuracy"]
               for rows in (ood, [repaired(r) for r in ood])]
        prompts = [r["input"].rstrip(" ") for r in ood]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping").tolist()
        with torch.no_grad():
            maps = model(**enc, output_attentions=True).attentions  # L maps, each (B, H, T, T)
        layers = []
        for a in maps:
            answer_row = a.mean(1)[:, -1]                            # (B, T)
            share = {kind: sum(answer_row[b, t].item() for b, r in enumerate(ood) for span in r["factors"][kind]
                               for c in cat.find_spans(prompts[b], span) for t in cat.tokens_in(offsets[b], c, c + len(span)))
                     / len(ood) for kind in ("causal", "spurious")}
            layers.append(f"{share['causal']:.2f}/{share['spurious']:.2f}")
        lines.append(f"{run:12s} | OOD {100 * acc[0]:5.1f} | OOD repaired {100 * acc[1]:5.1f} | "
                     f"causal/spurious by layer {'  '.join(layers)}")
        gaps.setdefault(run.split("_")[0], []).append(acc[1] - acc[0])
    print("\nSTG_L models, OOD test (400 rows):\n" + "\n".join(lines))
    # the README's reading: CAT's models still take spurious values into account
    assert mean_std(gaps["CAT"])[0] >= 0.05
