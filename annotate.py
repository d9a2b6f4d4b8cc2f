"""
annotate.py: word-level causal links for any dataset, written by an assistant LLM behind an
OpenAI-compatible endpoint (paper: Section 4.1 and Appendix B).

    python annotate.py --task gsm8k --input raw.jsonl --output annotated.jsonl
    OPENAI_BASE_URL=http://localhost:8000/v1 python annotate.py --task mawps \\
        --model Qwen2.5-7B-Instruct --input mawps.jsonl --output mawps.annotated.jsonl --workers 8

Writes each row plus `important`, [{effect span: [cause spans]}]. Rerun a killed run to resume.
"""
import argparse
import concurrent.futures
import json
import os
import random
import re
import threading
import time
from collections import Counter

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.exceptions import InvalidHeader, MaxRetryError, NewConnectionError
from urllib3.util import Retry

# -----------------------------------------------------------------------------
# the row format, shared with cat.py: read_rows (a file's rows), find_spans (where a span
# occurs), linkable (the links cat.py can use)


class Fatal(Exception):
    """Stop the run: bad input (named by file, line and field), or an endpoint that cannot work."""


def read_rows(path, need_important=False, lines=None):
    """The rows of a JSONL file, each checked by check_row (Fatal names the file, line and field of
    the first bad one); `need_important`: each must have links; `lines` gets their line numbers."""
    with open(path, "rb") as f:
        data = f.read()
    rows = []
    for n, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):  # a BOM: ignored
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Fatal(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                        f"{e.start + 1}); is it a JSONL file?") from None
        if line.strip():
            rows.append(check_row(path, n, line, need_important))
            lines is None or lines.append(n)
    return rows


def check_row(path, n, line, need_important):
    """One line as a row: an object with a string `input`, a string or number `target`, maybe
    `important` [{effect: [causes]}] and `factors` {kind: [spans]}; else Fatal saying why."""
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
    links = [as_links(x) for x in row.get("important", [])] \
        if isinstance(row.get("important", []), list) else [None]
    if None in links:
        raise Fatal(f"{path}:{n}: field 'important' must be a list of " '{"effect": ["cause"]}')
    factors = row.get("factors", {})
    if not isinstance(factors, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in factors.values()):
        raise Fatal(f'{path}:{n}: field \'factors\' must be {{"causal": ["span", ...], ...}}')
    return dict(row, important=links) if "important" in row else row


def as_links(obj):
    """`obj` as {effect: [causes]} (a lone cause string as a list of one), or None."""
    if not isinstance(obj, dict):
        return None
    links = {e: [c] if isinstance(c, str) else c for e, c in obj.items()}
    ok = all(isinstance(c, list) and all(isinstance(s, str) for s in c) for c in links.values())
    return links if ok else None


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

# -----------------------------------------------------------------------------
# annotating: the endpoint (Client), a reply's links (parse_links), a row (annotate_row), main

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
TASKS = sorted(f[:-4] for f in os.listdir(PROMPTS) if f.endswith(".txt"))
REASK_TEMPERATURE = 0.7  # a row asked again is asked this warm at least: at 0, servers repeat

parser = argparse.ArgumentParser(
    description="Annotate JSONL rows with causal links from an OpenAI-compatible endpoint.",
    epilog="Exit status: 0, every row annotated; 1, some rows failed (in X.failed.jsonl: rerun to "
    "ask them again); 2, bad flags or input, or an endpoint that cannot be used (unreachable, "
    "401, 404): the run stops at once.")
add = parser.add_argument
add("--task", help=f"prompt template from prompts/: {', '.join(TASKS)}")
add("--prompt", help="your own template file; '{text}' marks where the row goes")
add("--input", required=True, help="JSONL with input and target")
add("--output", required=True, help="JSONL to write and resume from")
add("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
    help="endpoint root (default: $OPENAI_BASE_URL, else OpenAI's)")
add("--model", default="gpt-4o-mini", help="model name the endpoint knows")
add("--temperature", type=float, default=0.0, help="0: greedy")
add("--max-tokens", type=int, default=512, help="most tokens of one reply")
add("--json-mode", action=argparse.BooleanOptionalAction, default=True, help="ask for JSON")
add("--workers", type=int, default=4, help="requests in flight at once")
add("--timeout", type=float, default=120.0, help="seconds to wait for one reply")
add("--retries", type=int, default=5, help="attempts per request (timeouts, replies cut off, "
    "408, 409, 429, 5xx), and per row whose reply cannot be used (asked warmer)")
add("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled each "
    "time, +-50%% jitter (Retry-After wins)")


class RowFailed(Exception):
    """This row could not be annotated: the message says why."""


class Backoff(Retry):
    """urllib3's Retry, waiting what the server asks (Retry-After, in seconds or as an HTTP date,
    or retry-after-ms; a malformed one is ignored), else --backoff seconds doubled each time,
    +-50%; never over 300 s. A refused connection or an unknown host is not retried: no row can
    work (Client.ask stops)."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None,
                  _stacktrace=None):
        if isinstance(error, NewConnectionError):  # a connection that timed out is retried
            raise MaxRetryError(_pool, url, error) from error
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def get_backoff_time(self):
        n = len(self.history)  # the attempts that failed so far
        return min(300.0, self.backoff_factor * 2 ** (n - 1) * random.uniform(0.5, 1.5)) if n else 0

    def get_retry_after(self, response):
        ms = response.headers.get("retry-after-ms")
        try:
            seconds = float(ms) / 1000 if ms else super().get_retry_after(response)
        except (ValueError, InvalidHeader):  # 'Retry-After: soon': the backoff instead
            return None
        return None if seconds is None else min(300.0, seconds)


class Client:
    """The endpoint, through an HTTP session whose adapter retries timeouts, broken connections,
    408, 409, 429 and 5xx (Backoff); `ask` retries a reply cut off in its body. `tally` counts
    every request and reply token, retries and re-asks included. After a Fatal, none starts."""

    def __init__(self, args, secret):
        self.args, self.url = args, args.base_url.rstrip("/") + "/chat/completions"
        self.lock, self.tally, self.stopped = threading.Lock(), Counter(), None
        self.scrub = lambda text: text.replace(secret, "***") if secret else text  # the API key
        self.retry = Backoff(total=args.retries - 1, backoff_factor=args.backoff,
                             status_forcelist=[408, 409, 429, *range(500, 600)],
                             allowed_methods=None, raise_on_status=False)
        self.session = requests.Session()  # its connection pool serves every worker thread
        self.session.mount(self.url, HTTPAdapter(max_retries=self.retry, pool_maxsize=args.workers))
        if secret:  # local servers need no key
            self.session.headers["Authorization"] = f"Bearer {secret}"

    def count(self, **counts):
        with self.lock:
            self.tally.update(counts)

    def stop(self, why):
        self.stopped = self.stopped or Fatal(self.scrub(why))
        return self.stopped

    def ask(self, prompt, temperature):
        """The text of one chat completion, and whether --max-tokens cut it off."""
        if self.stopped:
            raise self.stopped
        body = dict(model=self.args.model, temperature=temperature, max_tokens=self.args.max_tokens,
                    messages=[{"role": "user", "content": prompt}])
        if self.args.json_mode:
            body["response_format"] = {"type": "json_object"}
        for attempt in range(1, self.args.retries + 1):
            try:  # the headers; the adapter retries what fails before them
                r = self.session.post(self.url, json=body, timeout=self.args.timeout, stream=True)
            except requests.ConnectionError as e:  # every attempt failed, or the first was refused
                reason = getattr(e.args[0], "reason", e) if e.args else e
                if isinstance(reason, NewConnectionError):  # refused, or no such host: no row works
                    raise self.stop(f"cannot reach {self.url}: {str(reason).split('): ')[-1]}")
                self.count(requests=self.args.retries)
                raise RowFailed(f"gave up after {self.args.retries} attempts: {reason}") from None
            except requests.RequestException as e:  # a malformed URL and the like
                raise self.stop(f"{self.url}: {e}") from None
            self.count(requests=1 + len(r.raw.retries.history))
            try:  # the body: a connection dropped or timed out in it is retried here
                r.content
                break
            except requests.RequestException as e:  # cut off, timed out: urllib3 closed it
                if attempt == self.args.retries:
                    raise RowFailed(f"gave up after {attempt} replies cut off: {e}") from None
                time.sleep(self.retry.new(history=(None,) * attempt).get_backoff_time())
        error = f"HTTP {r.status_code}: {self.scrub(r.text[:300].strip())}"
        if r.status_code in (401, 404):  # a bad key, a wrong --model or --base-url
            raise self.stop(f"{self.url} refused the request ({error})")
        if r.status_code != 200:  # a status the adapter retries is one it gave up on
            gave_up = f"gave up after {self.args.retries} attempts: "
            raise RowFailed(gave_up * r.raw.retries.is_retry("POST", r.status_code) + error)
        try:
            reply = r.json()
            self.count(**{k: v for k, v in (reply.get("usage") or {}).items()
                          if k in ("prompt_tokens", "completion_tokens")})
            choice = reply["choices"][0]
            return choice["message"]["content"], choice.get("finish_reason") == "length"
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RowFailed(f"not a chat completion: {self.scrub(r.text[:200])}") from None


def parse_links(reply, text):
    """(important, links dropped) from a reply: the JSON object in it (bare, or in a code fence or
    prose), of lists of strings. Links cat.py could not use (`linkable`) are dropped, each once.

    >>> parse_links('Sure:\\n```json\\n{"12": ["7 red", "9 blue"]}\\n```', "7 red or 5 blue? 12")
    ([{'12': ['7 red']}], 1)
    """
    try:
        links = as_links(json.loads(reply[reply.find("{"):reply.rfind("}") + 1]))
    except json.JSONDecodeError:
        raise RowFailed(f"reply is not JSON: {reply[:200]!r}") from None
    if links is None:
        raise RowFailed(f"reply is not an object of lists of strings: {reply[:200]!r}")
    important, dropped = [], 0
    for effect, causes in links.items():
        causes = list(dict.fromkeys(causes))
        kept = [c for c in causes if linkable(text, effect, c)]
        dropped += len(causes) - len(kept)
        important += [{effect: kept}] if kept else []
    if not important:
        raise RowFailed(f"no usable link: no cause occurs as a whole word before its effect "
                        f"({reply[:200]!r})")
    return important, dropped


def annotate_row(row, template, args, client):
    """One row's work: its prompt asked, and asked again (warmer) while the reply cannot be used,
    up to --retries times: (the row with `important`, links dropped, None) or (None, 0, why)."""
    text, reason = row["input"] + str(row["target"]), None
    for attempt in range(args.retries):
        warmth = args.temperature if attempt == 0 else max(args.temperature, REASK_TEMPERATURE)
        try:
            reply, cut = client.ask(template.replace("{text}", text), warmth)
        except RowFailed as e:  # the request failed, after the adapter's retries
            return None, 0, str(e)
        try:
            important, dropped = parse_links(reply, text)
        except RowFailed as e:
            reason = f"{e}{' (the reply hit --max-tokens)' if cut else ''}"
        else:
            return dict(row, important=important), dropped, None
    return None, 0, f"{reason} (asked {args.retries} times)"


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


def saved_rows(rows, path):
    """({input index: its row saved by an earlier run}, the saved rows of no input row, kept in
    order); equal rows match in order. A last line with no newline is ended, or cut if torn."""
    if not os.path.exists(path):
        return {}, []
    with open(path, "rb+") as f:
        tail = f.read().rsplit(b"\n", 1)[-1]
        try:  # a last line without its newline: ended if whole, cut if torn (not JSON)
            f.write(b"\n" if tail and json.loads(tail) else b"")
        except ValueError:
            f.truncate(f.tell() - len(tail))
            print(f"{path}: cut off its torn last line ({len(tail)} bytes, left by a killed write)")
    key = lambda r: json.dumps({k: v for k, v in r.items() if k != "important"}, sort_keys=True)
    saved, spare = read_rows(path), {}
    for r in saved:
        spare.setdefault(key(r), []).append(r)  # the saved copies of each input row, in order
    done = {i: spare[key(row)].pop(0) for i, row in enumerate(rows) if spare.get(key(row))}
    return done, [r for r in saved if any(r is s for s in spare[key(r)])]  # the copies left


def main(argv=None):
    args = parser.parse_args(argv)
    template = check_flags(args)
    rows = read_rows(args.input)
    done, unmatched = saved_rows(rows, args.output)
    todo = [i for i in range(len(rows)) if i not in done]
    client, t0 = Client(args, os.environ.get("OPENAI_API_KEY", "")), time.time()
    failed_path, tally = re.sub(r"(\.jsonl)?$", ".failed.jsonl", args.output, count=1), client.tally
    print(f"{len(rows)} rows: {len(done)} saved by an earlier run, {len(todo)} to ask "
          f"{args.base_url} ({args.model}); {len(unmatched)} saved rows match no input row: kept")
    with open(args.output, "a", encoding="utf-8", buffering=1) as out, \
            open(failed_path, "w", encoding="utf-8", buffering=1) as failed, \
            concurrent.futures.ThreadPoolExecutor(args.workers) as pool, \
            tqdm(total=len(todo), desc="annotate", disable=None) as bar:
        futures = {pool.submit(annotate_row, rows[i], template, args, client): i for i in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                row, dropped, reason = future.result()  # Fatal: the run stops
                if row is None:
                    failed.write(json.dumps({"line": i + 1, "reason": reason, "row": rows[i]},
                                            ensure_ascii=False) + "\n")
                else:  # flushed a line at a time: a kill tears one line at most, cut next run
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[i] = row
                client.count(ok=row is not None, failed=row is None, dropped=dropped)
                bar.update()
                bar.set_postfix(ok=tally["ok"], failed=tally["failed"])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    # rewrite the output in input order, then the rows of no input; os.replace is atomic
    with open(args.output + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                     for r in [done[i] for i in sorted(done)] + unmatched)
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
        parser.exit(1 if main()["failed"] else 0)  # 1: rows failed; rerun to ask them again
    except (Fatal, OSError) as e:  # bad flags or input, a missing file, an unusable endpoint
        parser.exit(2, f"annotate.py: error: {e}\n")
