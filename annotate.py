"""
annotate.py: word-level causal links for any dataset, written by an assistant LLM behind an
OpenAI-compatible endpoint (paper: Section 4.1 and Appendix B).

    python annotate.py --task gsm8k --input raw.jsonl --output annotated.jsonl
    OPENAI_BASE_URL=http://localhost:8000/v1 python annotate.py --task mawps \\
        --model Qwen2.5-7B-Instruct --input mawps.jsonl --output mawps.annotated.jsonl --workers 8

Reads rows with `input` and `target`; writes each row unchanged plus `important`, a list of
{effect span: [cause spans]}, the format stg.py writes and cat.py reads (the rules for both,
`read_rows` and `find_spans`, are here). Kill a run at any moment and rerun it to resume; rows
that fail go to X.failed.jsonl with the reason, and are asked again by the next run.
"""
import argparse
import concurrent.futures
import email.utils
import json
import os
import random
import re
import sys
import threading
import time
from collections import Counter

import requests
from tqdm import tqdm
from urllib3.exceptions import NewConnectionError

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
TASKS = sorted(f[:-4] for f in os.listdir(PROMPTS) if f.endswith(".txt"))
RETRY_STATUS = {408, 409, 429}  # and every 5xx
REASK_TEMPERATURE = 0.7  # a row asked again is asked this warm at least: at 0, servers repeat

parser = argparse.ArgumentParser(
    description="Annotate JSONL rows with causal links from an OpenAI-compatible endpoint.",
    epilog="Exit status: 0, every row annotated; 1, the run ended with failed rows (listed in "
    "X.failed.jsonl; rerun to ask them again); 2, bad flags or input, or an endpoint that cannot "
    "be used (unreachable, 401, 404): the run stops at once.")
parser.add_argument("--task", help=f"prompt template from prompts/: {', '.join(TASKS)}")
parser.add_argument("--prompt", help="your own template file instead of --task; '{text}' marks "
                    "where the row goes")
parser.add_argument("--input", required=True, help="JSONL with input and target")
parser.add_argument("--output", required=True, help="JSONL to write (and to resume from); "
                    "failures go to X.failed.jsonl")
parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL",
                                                         "https://api.openai.com/v1"),
                    help="endpoint root, without /chat/completions (default: $OPENAI_BASE_URL "
                    "or OpenAI's)")
parser.add_argument("--model", default="gpt-4o-mini", help="model name the endpoint knows")
parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature "
                    "(0: greedy)")
parser.add_argument("--max-tokens", type=int, default=512, help="most tokens of one reply (a "
                    "long GSM8K annotation takes about 300)")
parser.add_argument("--json-mode", action=argparse.BooleanOptionalAction, default=True,
                    help="ask for response_format json_object; --no-json-mode for servers that "
                    "reject it")
parser.add_argument("--workers", type=int, default=4, help="requests in flight at once, one HTTP "
                    "session each")
parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one reply")
parser.add_argument("--retries", type=int, default=5, help="attempts per request on timeouts, "
                    "408, 409, 429 and 5xx; and times a row is asked when its reply cannot be used "
                    "(not JSON, no usable link), again at temperature 0.7 or more")
parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, "
                    "doubled each attempt, with +-50%% jitter (Retry-After wins)")


class Fatal(Exception):
    """Stop the whole run: bad input (the message names the file, line and field), or an
    endpoint that cannot be used."""


class RowFailed(Exception):
    """This row could not be annotated; the message is the reason."""

# -----------------------------------------------------------------------------
# files


def read_rows(path, output=False, need_important=False):
    """Rows of a JSONL file, for annotate.py and cat.py alike: every line UTF-8 text and an object
    with a string `input`, a string or number `target`, where given (and with `need_important`,
    always) `important` as a list of {effect: [causes]}, and where given `factors` as
    {kind: [spans]}. A bad line raises Fatal naming the file, line and field. For --output
    (written by an earlier, maybe killed run), a torn last line is cut off the file."""
    with open(path, "rb") as f:
        data = f.read()
    if output and data and not data.endswith(b"\n"):  # killed mid-write: drop the partial line
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "wb") as f:
            f.write(data)
    rows = []
    for n, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):  # a BOM: ignored
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Fatal(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                        f"{e.start + 1}); is it a JSONL file?") from None
        if line.strip():
            rows.append(check_row(path, n, line, need_important))
    return rows


def check_row(path, n, line, need_important):
    """One line of a JSONL file as a row, or Fatal naming what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise Fatal(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
    for field in ["input", "target"] + ["important"] * need_important:
        if not isinstance(row, dict) or field not in row:
            raise Fatal(f"{path}:{n}: missing field '{field}'")
    if not isinstance(row["input"], str):
        raise Fatal(f"{path}:{n}: field 'input' must be a string")
    if isinstance(row["target"], bool) or not isinstance(row["target"], (str, int, float)):
        raise Fatal(f"{path}:{n}: field 'target' must be a string or a number")
    if "important" in row:
        links = [as_links(x) for x in row["important"]] \
            if isinstance(row["important"], list) else [None]
        if None in links:
            raise Fatal(f"{path}:{n}: field 'important' must be a list of "
                        '{"effect": ["cause", ...]}')
        row = dict(row, important=links)
    factors = row.get("factors", {})
    if not isinstance(factors, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in factors.values()):
        raise Fatal(f'{path}:{n}: field \'factors\' must be {{"causal": ["span", ...], ...}}')
    return row


def key(row):
    """A row's identity, `important` aside: how a resumed run knows which input rows are saved."""
    return json.dumps({k: v for k, v in row.items() if k != "important"}, sort_keys=True)


def saved_positions(rows, saved):
    """{input index: saved row}. Identical input rows are matched one-to-one, in order."""
    left, out = Counter(key(r) for r in saved), {}
    by_key = {key(r): r for r in saved}
    for i, row in enumerate(rows):
        if left[key(row)] > 0:
            left[key(row)] -= 1
            out[i] = by_key[key(row)]
    return out

# -----------------------------------------------------------------------------
# the endpoint


def retry_after(headers):
    """Seconds the server asks us to wait: retry-after-ms, or Retry-After in seconds or as an
    HTTP date."""
    if "retry-after-ms" in headers:
        return float(headers["retry-after-ms"]) / 1000
    value = headers.get("Retry-After")
    if value is None:
        return None
    if re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        return float(value)
    when = email.utils.parsedate_to_datetime(value)
    return max(0.0, when.timestamp() - time.time())


def ask(session, args, prompt, temperature, secret, spent):
    """POST one chat completion with retries; return the reply's text, and whether --max-tokens cut
    it off. `spent` counts every request and the tokens of every reply, used or not."""
    url = args.base_url.rstrip("/") + "/chat/completions"
    body = {"model": args.model, "temperature": temperature, "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": prompt}]}
    if args.json_mode:
        body["response_format"] = {"type": "json_object"}
    error = None
    for attempt in range(args.retries):
        wait = None
        spent(requests=1)
        try:
            r = session.post(url, json=body, timeout=args.timeout)
        except requests.Timeout:
            error = f"timed out after {args.timeout:g}s"
        except requests.ConnectionError as e:
            reason = getattr(e.args[0], "reason", None) if e.args else None
            if isinstance(reason, NewConnectionError):  # refused, or no such host: no row can work
                raise Fatal(f"cannot reach {url}: {str(reason).split('): ')[-1]}") from None
            error = type(e).__name__  # the connection broke off: worth another try
        except requests.RequestException as e:  # a malformed URL and the like
            raise Fatal(f"{url}: {scrub(str(e), secret)}") from None
        else:
            if r.status_code == 200:
                try:
                    reply = r.json()
                    spent(**{k: v for k, v in (reply.get("usage") or {}).items()
                             if k in ("prompt_tokens", "completion_tokens")})
                    choice = reply["choices"][0]
                    return choice["message"]["content"], choice.get("finish_reason") == "length"
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    raise RowFailed(f"not a chat completion: {scrub(r.text[:200], secret)}") \
                        from None
            error = f"HTTP {r.status_code}: {scrub(r.text[:300].strip(), secret)}"
            if r.status_code in (401, 404):  # a bad key, a wrong --model or --base-url
                raise Fatal(f"{url} refused the request ({error})")
            if r.status_code not in RETRY_STATUS and r.status_code < 500:
                raise RowFailed(error)
            wait = retry_after(r.headers)
        if attempt + 1 < args.retries:
            backoff = args.backoff * 2 ** attempt * random.uniform(0.5, 1.5)
            time.sleep(min(300.0, wait if wait is not None else backoff))
    raise RowFailed(f"gave up after {args.retries} attempts: {error}")


def scrub(text, secret):
    return text.replace(secret, "***") if secret else text


def find_spans(text, span):
    """Start offsets of every whole-word occurrence of `span` in `text`: the one rule for where a
    span occurs, used here to keep links and by cat.py to find them.

    >>> find_spans("5 apples, 15 pears, 5 left", "5")   # not the 5 inside 15
    [0, 20]
    """
    if not span:
        return []
    left = r"(?<!\w)" if re.match(r"\w", span[0]) else ""
    right = r"(?!\w)" if re.match(r"\w", span[-1]) else ""
    return [m.start() for m in re.finditer(left + re.escape(span) + right, text)]


def linkable(text, effect, cause):
    """True when some whole-word occurrence of `cause` ends before some occurrence of `effect`
    starts: the links cat.py can use (it counts the others as missing).

    >>> linkable("Tom has 15. Answer: 15", "Answer: 15", "15"), linkable("Tom has 15.", "Tom", "5")
    (True, False)
    """
    starts = find_spans(text, effect)
    return any(c + len(cause) <= max(starts, default=-1) for c in find_spans(text, cause))


def as_links(obj):
    """`obj`, one {effect: [causes]} object of a reply or of a row's `important`, a cause given as
    one string read as a list of one (as in a few of the authors' rows); None for another shape."""
    if not isinstance(obj, dict):
        return None
    links = {e: [c] if isinstance(c, str) else c for e, c in obj.items()}
    if all(isinstance(c, list) and all(isinstance(s, str) for s in c) for c in links.values()):
        return links
    return None


def parse_links(reply, text):
    """(important, links dropped) from a reply: one JSON object mapping strings to lists of
    strings, bare or inside a code fence or prose. Links cat.py could not use (see `linkable`)
    are dropped and counted, each (effect, cause) pair once, as cat.py counts them.

    >>> parse_links('Sure:\\n```json\\n{"12": ["7 red", "9 blue"]}\\n```', "7 red or 5 blue? 12")
    ([{'12': ['7 red']}], 1)
    """
    fenced = re.search(r"```(?:json)?\s*(.*?)```", reply, re.S)
    candidates = [reply, fenced and fenced.group(1), reply[reply.find("{"):reply.rfind("}") + 1]]
    for candidate in filter(None, candidates):
        try:
            links = json.loads(candidate)
            break
        except json.JSONDecodeError:
            pass
    else:
        raise RowFailed(f"reply is not JSON: {reply[:200]!r}")
    links = as_links(links)
    if links is None:
        raise RowFailed(f"reply is not an object of lists of strings: {reply[:200]!r}")
    important, dropped = [], 0
    for effect, causes in links.items():
        causes = list(dict.fromkeys(causes))
        kept = [c for c in causes if linkable(text, effect, c)]
        dropped += len(causes) - len(kept)
        if kept:
            important.append({effect: kept})
    if not important:
        raise RowFailed(f"no usable link: no cause occurs as a whole word before its effect "
                        f"({reply[:200]!r})")
    return important, dropped

# -----------------------------------------------------------------------------
# main


def check_flags(args):
    """Every flag checked before a file is read or a request made: Fatal names the flag and what
    it needs; then the template, which must be UTF-8 text with a '{text}' placeholder."""
    needs = {"--workers": (args.workers >= 1, "at least 1"),
             "--retries": (args.retries >= 1, "at least 1"),
             "--max-tokens": (args.max_tokens >= 1, "at least 1"),
             "--timeout": (0 < args.timeout < float("inf"), "a positive number of seconds"),
             "--backoff": (0 <= args.backoff < float("inf"), "0 or more seconds"),
             "--temperature": (0 <= args.temperature <= 2, "a number from 0 to 2")}
    for flag, (fine, need) in needs.items():
        if not fine:
            raise Fatal(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: needs {need}")
    if args.prompt is None and args.task not in TASKS:
        raise Fatal(f"unknown --task {args.task!r}; known tasks: {', '.join(TASKS)} "
                    "(or give --prompt FILE)")
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise Fatal(f"--output {args.output}: the same file as --input; give another")
    path = args.prompt or os.path.join(PROMPTS, args.task + ".txt")
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read()
    except UnicodeDecodeError as e:
        raise Fatal(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if "{text}" not in template:
        raise Fatal(f"{path}: the template has no '{{text}}' placeholder")
    return template


def main(argv=None):
    args = parser.parse_args(argv)
    template = check_flags(args)
    rows = read_rows(args.input)
    done = saved_positions(rows, read_rows(args.output, output=True)
                           if os.path.exists(args.output) else [])
    todo = [i for i in range(len(rows)) if i not in done]
    secret = os.environ.get("OPENAI_API_KEY", "")
    failed_path = re.sub(r"(\.jsonl)?$", ".failed.jsonl", args.output, count=1)
    sessions, tally, lock, t0 = threading.local(), Counter(), threading.Lock(), time.time()
    fatal = []  # the first answer that stops the run

    def spent(**counts):  # every request and every reply's tokens, from any worker
        with lock:
            tally.update(counts)

    def annotate(i):
        if fatal:  # start no new request; the run stops with the server's first answer
            raise Fatal(str(fatal[0]))
        if not hasattr(sessions, "s"):  # one HTTP session per worker thread
            sessions.s = requests.Session()
            if secret:  # optional: local servers need no key
                sessions.s.headers["Authorization"] = f"Bearer {secret}"
        text = rows[i]["input"] + str(rows[i]["target"])
        prompt = template.replace("{text}", text)
        for attempt in range(args.retries):  # a reply that cannot be used is asked for again
            warmth = args.temperature if attempt == 0 else max(args.temperature, REASK_TEMPERATURE)
            try:
                reply, cut = ask(sessions.s, args, prompt, warmth, secret, spent)
            except Fatal as e:
                fatal.append(e)
                raise
            try:
                important, dropped = parse_links(reply, text)
                return dict(rows[i], important=important), dropped
            except RowFailed as e:
                reason = f"{e}{' (the reply hit --max-tokens)' if cut else ''}"
        raise RowFailed(f"{reason} (asked {args.retries} times)")

    print(f"{len(rows)} rows: {len(done)} saved by an earlier run, {len(todo)} to ask "
          f"{args.base_url} ({args.model})")
    bar = tqdm(total=len(todo), desc="annotate", disable=None)
    with open(args.output, "a", encoding="utf-8") as out, \
            open(failed_path, "w", encoding="utf-8") as failed, \
            concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(annotate, i): i for i in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    row, dropped = future.result()
                except RowFailed as e:
                    record = {"line": i + 1, "reason": str(e), "row": rows[i]}
                    failed.write(json.dumps(record, ensure_ascii=False) + "\n")
                    failed.flush()
                    tally["failed"] += 1
                else:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    out.flush()  # a kill loses at most the line being written: repaired next run
                    done[i] = row
                    tally.update(ok=1, dropped=dropped)
                bar.update()
                bar.set_postfix(ok=tally["ok"], failed=tally["failed"])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    bar.close()
    # rewrite the output in input order; os.replace is atomic: a kill here leaves the old file
    with open(args.output + ".tmp", "w", encoding="utf-8") as f:
        for i in sorted(done):
            f.write(json.dumps(done[i], ensure_ascii=False) + "\n")
    os.replace(args.output + ".tmp", args.output)
    if not tally["failed"]:
        os.remove(failed_path)
    print(f"rows {len(rows)} | ok {len(done)} ({tally['ok']} this run) | failed {tally['failed']}"
          f"{f' (see {failed_path})' if tally['failed'] else ''} | links dropped "
          f"{tally['dropped']} | requests {tally['requests']} | tokens {tally['prompt_tokens']} "
          f"prompt + {tally['completion_tokens']} completion | {time.time() - t0:.1f}s")
    return tally


if __name__ == "__main__":
    try:
        sys.exit(1 if main()["failed"] else 0)  # 1: rows failed; rerun to ask them again
    except (Fatal, OSError) as e:  # bad flags or input, a missing file, an unusable endpoint
        print(f"annotate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
