"""
stg.py: the Spurious Token Game (STG), the benchmark of Causal Attention Tuning
(paper: Section 5.2.1 and Appendix A).

    python stg.py --out data              # seed 42; same seed, byte-identical files

Each example lists attributes as `Name: value` pairs and asks for an answer that only the
*causal* attributes decide. *Spurious* attributes are copies of causal ones in the training data
and the IID test, so a model can shortcut through them; in the OOD test the copies are drawn
independently and the shortcut breaks (`baselines` scores it). *Irrelevant* ones are noise.
STG_E (easy): lung-cancer risk, "High Risk" or "Low Risk", from 8 attributes; STG_H (hard): an
air-quality index, an integer 0..100, from 14 attributes.

Every JSONL row has the fields of the authors' published files plus `factors`:
    input      the question, ending in "Answer: "
    target     the answer ("High Risk" / "Low Risk", or an int for STG_H)
    important  [{effect span: [cause spans]}], every span a substring of input + str(target)
    factors    {"causal": [...], "spurious": [...], "irrelevant": [...]}: `Name: value` substrings
"""
import argparse
import json
import os
import random
import re
from collections import Counter
from fractions import Fraction
from statistics import fmean

# -----------------------------------------------------------------------------
# STG_E: 3 causal, 3 spurious, 2 irrelevant attributes, each 1..10

STG_E_PROMPT = ("Here is the statistical data for a person. "
                "Please predict the probability of cancer. ")


def stg_e_label(smoking, weight, exercise):
    """The paper's rule 1.2*Smoking + 0.7*Weight - Exercise >= 7.2, times ten, in integers.

    >>> stg_e_label(1, 10, 1), stg_e_label(1, 10, 2)   # 12+70-10 = 72 >= 72; 62 < 72
    ('High Risk', 'Low Risk')
    >>> 1.2 * 1 + 0.7 * 10 - 1 >= 7.2                 # why not floats: 7.199999999999999
    False
    """
    return "High Risk" if 12 * smoking + 7 * weight - 10 * exercise >= 72 else "Low Risk"


def stg_e_example(rng, ood=False):
    """One STG_E row drawn with `rng` (a random.Random); `ood` breaks the spurious links."""
    smoking, weight, exercise = rng.randint(1, 10), rng.randint(1, 10), rng.randint(1, 10)
    if ood:  # spurious values drawn independently of their causes
        yellow, clothing, hormones = rng.randint(1, 10), rng.randint(1, 10), rng.randint(1, 10)
    else:    # spurious values are functions of their causes, rounded down
        yellow, clothing, hormones = 3 * smoking // 2, weight, exercise // 2
    gene, room = rng.randint(1, 10), rng.randint(1, 10)
    causal = [f"Smoking: {smoking}", f"Weight: {weight}", f"Exercise: {exercise}"]
    spurious = [f"Yellow fingers: {yellow}", f"Clothing size: {clothing}", f"Hormones: {hormones}"]
    irrelevant = [f"Certain gene: {gene}", f"Room size: {room}"]
    pairs = causal + spurious + irrelevant
    rng.shuffle(pairs)  # a fresh order in every example
    label = stg_e_label(smoking, weight, exercise)
    text = STG_E_PROMPT + ", ".join(pairs) + " Answer: "
    return make_row(text, label, label, causal, spurious, irrelevant)

# -----------------------------------------------------------------------------
# STG_H: 6 causal, 5 spurious, 3 irrelevant attributes; the answer is an air-quality index.
# Values live on a 0.1 grid and are kept as integers in tenths, so the target is exact.

STG_H_QUESTION = ("Given these diverse conditions, what is the projected Air Quality Index (AQI) "
                  "on a 0-100 scale? Answer: ")
# causal factor: (name, low, high, unit, weight in AQI); drawn uniformly from [low, high]
STG_H_CAUSES = [
    ("Industrial Emissions", 30, 70, "", +6),
    ("Vehicle Emissions", 20, 60, "", +5),
    ("Coal Dependency", 10, 50, "%", +4),
    ("Agricultural Burning", 10, 30, "", +3),
    ("Urban Green Coverage", 40, 80, "%", -4),
    ("Meteorological Dispersion", 50, 90, "", -6),
]
# spurious factor: (name, index of its cause, slope, noise sd in tenths, shown as integer)
STG_H_SPURIOUS = [
    ("Ice Cream Sales Index", 5, 0.4, 20, False),
    ("Allergy Complaints Level", 3, 0.2, 10, False),
    ("Renewable Stock Index", 0, 1.1, 15, True),
    ("Public Transport Subscriptions (k)", 1, 0.15, 20, False),
    ("Water Awareness Score", 4, -0.1, 10, False),
]


def tenths(t):
    """Format an integer count of tenths: tenths(-7) == '-0.7', tenths(431) == '43.1'."""
    return f"{'-' if t < 0 else ''}{abs(t) // 10}.{abs(t) % 10}"


def ordinal(n):
    """ordinal(1) == '1st', ordinal(12) == '12th', ordinal(23) == '23rd'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def stg_h_aqi(causes):
    """AQI = 40 + 0.6 IE + 0.5 VE + 0.4 CD + 0.3 AB - 0.4 UGC - 0.6 MD, rounded half up, clipped
    to 0..100. `causes` are the six values in tenths, so 100*AQI is an exact integer.

    >>> stg_h_aqi([500, 400, 300, 200, 600, 700])   # 40+30+20+12+6-24-42
    42
    """
    hundredths = 4000 + sum(w * c for (_, _, _, _, w), c in zip(STG_H_CAUSES, causes))
    return min(100, max(0, (hundredths + 50) // 100))


def stg_h_example(rng, ood=False):
    """One STG_H row drawn with `rng`; `ood` draws each spurious factor from a fresh, independent
    draw of its cause, which keeps its distribution and breaks its link."""
    def draw(k):  # cause k, uniform on its range, in tenths
        _, lo, hi, _, _ = STG_H_CAUSES[k]
        return rng.randint(lo * 10, hi * 10)

    causes = [draw(k) for k in range(len(STG_H_CAUSES))]
    causal = [f"{name}: {tenths(c)}{unit}"
              for (name, _, _, unit, _), c in zip(STG_H_CAUSES, causes)]
    spurious = []
    for name, k, slope, sd, integer in STG_H_SPURIOUS:
        cause = draw(k) if ood else causes[k]
        t = round(slope * cause + rng.gauss(0, sd))
        spurious.append(f"{name}: {round(t / 10) if integer else tenths(t)}")
    irrelevant = [f"City Anniversary: {ordinal(rng.randint(1, 100))}",
                  f"Average Internet Speed: {tenths(rng.randint(800, 1200))}Mbps",
                  f"Number of Libraries: {rng.randint(10, 50)}"]
    groups = (causal, spurious, irrelevant)
    text = ". ".join("; ".join(group) for group in groups) + ". " + STG_H_QUESTION
    aqi = stg_h_aqi(causes)
    return make_row(text, aqi, f"Answer: {aqi}", causal, spurious, irrelevant)

# -----------------------------------------------------------------------------
# baselines: what answers that never read a cause score
STG_SPURIOUS = [["Yellow fingers", "Clothing size", "Hormones"], [s[0] for s in STG_H_SPURIOUS]]


def spurious_values(row):
    """x = (1, the spurious values...) of a row with `factors`: what a shortcut reads."""
    return [1.0] + [float(re.search(r": (-?[\d.]+)", s).group(1))
                    for s in row["factors"]["spurious"]]


def shortcut(row):
    """STG_E's label with the spurious copies put for their causes, exactly: Yellow fingers / 1.5
    for Smoking, Clothing size for Weight, 2 x Hormones for Exercise."""
    _, yellow, clothing, hormones = map(Fraction, spurious_values(row))
    return stg_e_label(yellow * 2 / 3, clothing, 2 * hormones)


def is_stg(row):
    """True for STG's own rows, whose spurious `factors` are STG_E's or STG_H's `Name: number`s."""
    spans = row.get("factors", {}).get("spurious", [])
    return [re.sub(r": -?\d+(\.\d+)?$", "", s) for s in spans] in STG_SPURIOUS


def baselines(train_rows, rows):
    """Accuracy on `rows` of `majority`, always the most common training target, and on STG's own
    rows (is_stg) of `shortcut`, the answer read off the spurious values: STG_E's `shortcut`; for
    STG_H, x·w rounded, w fitted to the training rows by least squares, and both mean absolute
    errors."""
    top = Counter(r["target"] for r in train_rows).most_common(1)[0][0]
    result = {"majority_answer": top, "majority": fmean(r["target"] == top for r in rows)}
    if not all(map(is_stg, train_rows + rows)):  # a task of its own: the majority alone
        return result
    if isinstance(top, str):  # STG_E
        return dict(result, shortcut=fmean(shortcut(r) == r["target"] for r in rows))
    import torch  # here alone: the rest of stg.py needs only the standard library
    X = torch.tensor([spurious_values(r) for r in train_rows], dtype=torch.float64)
    y = torch.tensor([[float(r["target"])] for r in train_rows], dtype=torch.float64)
    w = torch.linalg.lstsq(X, y).solution.flatten().tolist()  # argmin_w Σ (x·w - y)²
    guess = lambda r: min(100, max(0, round(sum(a * b for a, b in zip(w, spurious_values(r))))))
    return dict(result, shortcut=fmean(guess(r) == r["target"] for r in rows),
                majority_mae=fmean(abs(r["target"] - top) for r in rows),
                shortcut_mae=fmean(abs(guess(r) - r["target"]) for r in rows))


def describe_baselines(b):
    """majority ('Low Risk') 67.0%, shortcut 97.5%; for STG_H, with their mean absolute errors."""
    mae = lambda k: f" (MAE {b[k + '_mae']:.1f})" if k + "_mae" in b else ""
    return f"majority ({b['majority_answer']!r}) {100 * b['majority']:.1f}%{mae('majority')}" + \
        (f", shortcut {100 * b['shortcut']:.1f}%{mae('shortcut')}" if "shortcut" in b else "")


# -----------------------------------------------------------------------------
# rows, splits, files
def make_row(text, target, effect, causal, spurious, irrelevant):
    """The JSONL row: the answer (effect span) is caused by the causal `Name: value` spans."""
    full = text + str(target)
    for span in [effect] + causal + spurious + irrelevant:
        assert full.count(span) == 1, f"span {span!r} must occur once in {full!r}"
    return {"input": text, "target": target, "important": [{effect: causal}],
            "factors": {"causal": causal, "spurious": spurious, "irrelevant": irrelevant}}


# file -> (task, split, rows); train_S and train_M are the first rows of train_L
FILES = {
    "stg_e/train_S.jsonl": ("stg_e", "train", 400),
    "stg_e/train_M.jsonl": ("stg_e", "train", 800),
    "stg_e/train_L.jsonl": ("stg_e", "train", 1600),
    "stg_e/test.jsonl": ("stg_e", "test", 400),
    "stg_e/ood.jsonl": ("stg_e", "ood", 400),
    "stg_h/train.jsonl": ("stg_h", "train", 3000),
    "stg_h/test.jsonl": ("stg_h", "test", 1000),
    "stg_h/ood.jsonl": ("stg_h", "ood", 1000),
}


def make_split(task, split, n, seed=42):
    """The first `n` rows of split "train", "test" or "ood" of "stg_e" or "stg_h". Each (task,
    split, seed) has its own random stream: the training sizes are nested."""
    rng = random.Random(f"{task}/{split}/{seed}")  # str seeds are hashed with sha512: stable
    example = stg_e_example if task == "stg_e" else stg_h_example
    return [example(rng, ood=(split == "ood")) for _ in range(n)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_all(out, seed=42):
    """Write every file of FILES under the folder `out`; return their paths."""
    paths = []
    for name, (task, split, n) in FILES.items():
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(path, make_split(task, split, n, seed))
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write the STG_E and STG_H benchmark files (8 JSONL files, see README).",
        epilog="An existing output folder is overwritten file by file; other files in it are kept.")
    parser.add_argument("--out", default="data", help="output folder (default: data)")
    parser.add_argument("--seed", type=int, default=42,
                        help="random seed; same seed, same bytes (default: 42)")
    args = parser.parse_args(argv)
    try:
        paths = write_all(args.out, args.seed)
    except OSError as e:  # no write permission, a file where a folder must go, a full disk
        parser.exit(2, f"stg.py: error: cannot write to {e.filename or args.out}: {e.strerror}\n")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
