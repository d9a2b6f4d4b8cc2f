"""
Tests for stg.py, cat.py and annotate.py. Hermetic: no network, no downloaded weights; models
are built from a config and tokenizers are trained in-process.

    python -m pytest -q test_cat.py
"""
import json
import math
import os
import re
import subprocess
import sys
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
