#!/usr/bin/env python
"""Train llmopt's small *reference model*: a Llama-architecture causal LM on the
King James Bible (public domain).

Everything (text extraction, train/eval split, tokenizer training, model
training, evaluation, model card) is done by this one script, on CPU with a
single torch thread.

Data source
-----------
The KJV text comes from the Debian packages ``bible-kjv-text`` (the compressed
data file /usr/lib/bible.data) and ``bible-kjv`` (the ``bible`` command that
reads it).  With pretty-printing switched off (``-f``) a single verse range
covering the whole Bible dumps every verse as one line::

    $ bible -f gen1:1-rev22:21
    Ge1:1 In the beginning God created the heaven and the earth.
    ...
    Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.

That is 31,102 verses, 1,189 chapters, 66 books.  The reference prefix
(``Ge1:1``) is parsed and stripped; each chapter becomes one document whose
lines are its verses (no verse numbers).  If the command is missing, install
it with ``apt-get install bible-kjv``.

Split
-----
Chapters are numbered 0..1188 in canonical order; every 20th chapter
(index % 20 == 10) is held out for evaluation, everything else is training
data.  The split is by whole chapters, so the held-out text never occurs in
training (apart from verses that the KJV itself repeats verbatim, e.g.
parallel passages in Kings/Chronicles).  The held-out chapters are written to
``<out>/eval.txt``, chapters separated by one blank line.

Tokenizer
---------
Byte-level BPE (``tokenizers``), trained on the training chapters only.
Special tokens: ``<s>``=0, ``</s>``=1, ``<unk>``=2, ``<pad>``=3.  The
tokenizer's post-processor prepends ``<s>`` (like Llama tokenizers), so
``tokenizer("In the beginning")`` starts with the BOS id.

Training / evaluation stream
----------------------------
Each chapter is encoded as ``<s> text </s>``; the documents are concatenated
into one token stream.  Training samples random windows of ``seq_len`` + 1
tokens from the training stream.  Validation loss / perplexity use the eval
stream cut into *non-overlapping* windows of ``seq_len`` tokens (the trailing
partial window is also scored); perplexity = exp(total NLL / predicted tokens)
in fp32.

Reproduce
---------
    /path/to/python tools/train_reference.py --out models/reference --minutes 38 --seed 0

The training loop is time-bounded: after a short timing calibration the number
of optimizer steps (which fixes the cosine schedule) is derived from the
budget and recorded in train_log.json as ``max_steps``; pass
``--max-steps N`` to repeat a run step-for-step without depending on the
machine's speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time

# One thread everywhere (shared 2-core machine); must be set before the
# numerical libraries are imported.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already initialised
    pass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
BOS_ID, EOS_ID, UNK_ID, PAD_ID = 0, 1, 2, 3

KJV_RANGE = "gen1:1-rev22:21"
KJV_VERSES = 31102
KJV_CHAPTERS = 1189
KJV_BOOKS = 66
VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")

BOOK_NAMES = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers", "Deu": "Deuteronomy",
    "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth", "1Sm": "1 Samuel", "2Sm": "2 Samuel",
    "1Ki": "1 Kings", "2Ki": "2 Kings", "1Chr": "1 Chronicles", "2Chr": "2 Chronicles",
    "Ezra": "Ezra", "Neh": "Nehemiah", "Est": "Esther", "Job": "Job", "Psa": "Psalms",
    "Prv": "Proverbs", "Eccl": "Ecclesiastes", "SSol": "Song of Solomon", "Isa": "Isaiah",
    "Jer": "Jeremiah", "Lam": "Lamentations", "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea",
    "Joel": "Joel", "Amos": "Amos", "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah",
    "Nahum": "Nahum", "Hab": "Habakkuk", "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah",
    "Mal": "Malachi", "Mat": "Matthew", "Mark": "Mark", "Luke": "Luke", "John": "John",
    "Acts": "Acts", "Rom": "Romans", "1Cor": "1 Corinthians", "2Cor": "2 Corinthians",
    "Gal": "Galatians", "Eph": "Ephesians", "Phi": "Philippians", "Col": "Colossians",
    "1Th": "1 Thessalonians", "2Th": "2 Thessalonians", "1Tim": "1 Timothy", "2Tim": "2 Timothy",
    "Titus": "Titus", "Phmn": "Philemon", "Heb": "Hebrews", "Jas": "James", "1Pet": "1 Peter",
    "2Pet": "2 Peter", "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John", "Jude": "Jude",
    "Rev": "Revelation",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data
def extract_kjv() -> list[dict]:
    """Return the KJV as a list of chapters: {book, chapter, text}."""
    exe = shutil.which("bible")
    if exe is None:
        sys.exit(
            "error: the `bible` command was not found. The reference model is trained on the King "
            "James Bible shipped by Debian; install it with\n\n    apt-get install -y bible-kjv\n\n"
            "(this also pulls in bible-kjv-text, which provides /usr/lib/bible.data)."
        )
    proc = subprocess.run(
        [exe, "-f", KJV_RANGE], stdin=subprocess.DEVNULL, capture_output=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"error: `bible -f {KJV_RANGE}` failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    lines = proc.stdout.decode("ascii").splitlines()
    chapters: list[dict] = []
    n_verses = 0
    for line in lines:
        if not line.strip():
            continue
        m = VERSE_RE.match(line)
        if m is None:
            sys.exit(f"error: unexpected line from `bible`: {line!r}")
        book, chap, _verse, text = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()
        if not chapters or chapters[-1]["book"] != book or chapters[-1]["chapter"] != chap:
            chapters.append({"book": book, "chapter": chap, "verses": []})
        chapters[-1]["verses"].append(text)
        n_verses += 1
    books = {c["book"] for c in chapters}
    if (n_verses, len(chapters), len(books)) != (KJV_VERSES, KJV_CHAPTERS, KJV_BOOKS):
        sys.exit(
            f"error: expected {KJV_VERSES} verses / {KJV_CHAPTERS} chapters / {KJV_BOOKS} books from "
            f"`bible`, got {n_verses} / {len(chapters)} / {len(books)}"
        )
    for c in chapters:
        c["text"] = "\n".join(c.pop("verses"))
    return chapters


def split_chapters(chapters: list[dict], every: int, offset: int) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for i, c in enumerate(chapters):
        (held if i % every == offset else train).append(c)
    return train, held


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    # Byte-level offsets handling + BOS prepended, as Llama tokenizers do.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
            ),
        ]
    )
    return tok


def encode_docs(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """<s> doc </s> for every document, concatenated (the post-processor adds <s>)."""
    out: list[int] = []
    for enc in tok.encode_batch(texts):
        out.extend(enc.ids)
        out.append(EOS_ID)
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------- eval
@torch.no_grad()
def stream_nll(model, stream: np.ndarray, seq_len: int, max_windows: int | None = None, batch: int = 16):
    """Sum of NLL and number of predicted tokens over non-overlapping windows."""
    model.eval()
    starts = list(range(0, len(stream) - 1, seq_len))
    if max_windows is not None:
        starts = starts[:max_windows]
    total, count = 0.0, 0
    full = [s for s in starts if s + seq_len + 1 <= len(stream)]
    tail = [s for s in starts if s + seq_len + 1 > len(stream)]
    for i in range(0, len(full), batch):
        chunk = np.stack([stream[s : s + seq_len + 1] for s in full[i : i + batch]])
        x = torch.from_numpy(chunk)
        logits = model(input_ids=x[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += x[:, 1:].numel()
    for s in tail:  # last, shorter window
        x = torch.from_numpy(stream[s:][None])
        if x.size(1) < 2:
            continue
        logits = model(input_ids=x[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x.size(1) - 1
    model.train()
    return total, count


# --------------------------------------------------------------------------- main
def main() -> None:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/reference", help="output dir (relative to the repo root)")
    ap.add_argument("--minutes", type=float, default=38.0, help="wall-clock budget for the whole run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="fix the step count / LR schedule")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=640)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=0, help="windows used for periodic val loss (0: all)")
    ap.add_argument("--patience", type=int, default=4, help="evals without improvement before stopping")
    ap.add_argument("--holdout-every", type=int, default=20)
    ap.add_argument("--holdout-offset", type=int, default=10)
    ap.add_argument("--max-weights-mb", type=float, default=20.0)
    ap.add_argument("--experts", type=int, default=0,
                    help="a mixture of experts (Mixtral architecture) with this many experts per layer, each of "
                         "--intermediate width; 0: the dense Llama reference")
    ap.add_argument("--experts-per-token", type=int, default=2)
    args = ap.parse_args()

    t_start = time.time()
    budget_s = args.minutes * 60.0
    out = args.out if os.path.isabs(args.out) else os.path.join(repo_root, args.out)
    os.makedirs(out, exist_ok=True)

    import random

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # ---- data
    chapters = extract_kjv()
    train_ch, eval_ch = split_chapters(chapters, args.holdout_every, args.holdout_offset)
    train_texts = [c["text"] for c in train_ch]
    eval_texts = [c["text"] for c in eval_ch]
    assert not ({(c["book"], c["chapter"]) for c in train_ch} & {(c["book"], c["chapter"]) for c in eval_ch})
    eval_txt = "\n\n".join(eval_texts) + "\n"
    with open(os.path.join(out, "eval.txt"), "w", encoding="utf-8") as f:
        f.write(eval_txt)
    log(
        f"KJV: {len(chapters)} chapters; train {len(train_ch)} ch / {sum(map(len, train_texts))} chars, "
        f"eval {len(eval_ch)} ch / {len(eval_txt)} chars"
    )

    # ---- tokenizer
    t0 = time.time()
    tok = train_tokenizer(train_texts, args.vocab_size)
    tok_time = time.time() - t0
    train_stream = encode_docs(tok, train_texts)
    # eval stream is derived from eval.txt exactly as perplexity is computed
    eval_docs = eval_txt.rstrip("\n").split("\n\n")
    assert eval_docs == eval_texts
    eval_stream = encode_docs(tok, eval_docs)
    log(
        f"tokenizer: vocab {tok.get_vocab_size()} in {tok_time:.1f}s; train {len(train_stream)} tokens, "
        f"eval {len(eval_stream)} tokens"
    )

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=args.seq_len * 2,
        clean_up_tokenization_spaces=False,
    )

    # ---- model
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        use_cache=True,
    )
    if args.experts:
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(**{k: v for k, v in config.to_dict().items()
                                  if k in MixtralConfig().to_dict() and k not in ("model_type", "architectures")},
                               num_local_experts=args.experts, num_experts_per_tok=args.experts_per_token,
                               output_router_logits=True, router_aux_loss_coef=0.01)
        model = MixtralForCausalLM(config)
    else:
        model = LlamaForCausalLM(config)
    model.float()
    n_params = sum(p.numel() for p in model.parameters())
    weights_bytes = n_params * 4
    log(f"model: {n_params:,} params, ~{weights_bytes / 1e6:.2f} MB fp32")
    if weights_bytes / 1e6 > args.max_weights_mb:
        sys.exit(f"error: {weights_bytes / 1e6:.2f} MB > --max-weights-mb {args.max_weights_mb}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    L = args.seq_len
    n_train = len(train_stream)

    def batch():
        starts = rng.integers(0, n_train - L - 1, size=args.batch_size)
        return torch.from_numpy(np.stack([train_stream[s : s + L + 1] for s in starts]))

    max_steps = args.max_steps

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        total = max_steps if max_steps is not None else 10**9
        prog = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    def val_loss(max_windows):
        tot, cnt = stream_nll(model, eval_stream, L, max_windows=max_windows or None)
        return tot / cnt

    # time reserved after the loop: final full eval, save, reload + perplexity, card
    reserve_s = 60.0
    curve = []
    train_losses = []
    step = 0
    tokens_seen = 0
    best = (float("inf"), -1)
    best_state = None
    bad_evals = 0
    stop_reason = "max_steps"
    calib_steps = 10
    t_train0 = time.time()
    model.train()
    v0 = val_loss(args.eval_windows)
    curve.append({"step": 0, "tokens": 0, "train_loss": None, "val_loss": v0, "elapsed_s": time.time() - t_start})
    log(f"step 0 val {v0:.4f}")
    t_eval_cost = time.time() - t_train0
    t_train0 = time.time()
    while True:
        if max_steps is not None and step >= max_steps:
            stop_reason = "max_steps"
            break
        if max_steps is None and step == calib_steps:
            per_step = (time.time() - t_train0) / calib_steps
            remaining = budget_s - (time.time() - t_start) - reserve_s
            n_evals_est = remaining / per_step / args.eval_every + 1
            remaining -= n_evals_est * t_eval_cost
            max_steps = max(args.warmup + 10, step + int(remaining / per_step))
            log(f"calibration: {per_step:.3f}s/step -> max_steps {max_steps}")
        if time.time() - t_start > budget_s - reserve_s:
            stop_reason = "time_budget"
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = batch()
        fwd = model(input_ids=x[:, :-1])
        logits = fwd.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        if getattr(fwd, "aux_loss", None) is not None:  # experts: the load-balancing loss keeps every expert in use
            loss = loss + config.router_aux_loss_coef * fwd.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x[:, :-1].numel()
        train_losses.append(loss.item())
        if step % args.eval_every == 0 or step == max_steps:
            v = val_loss(args.eval_windows)
            tl = float(np.mean(train_losses[-args.eval_every :]))
            curve.append(
                {"step": step, "tokens": tokens_seen, "train_loss": tl, "val_loss": v, "lr": lr_at(step - 1),
                 "elapsed_s": time.time() - t_start}
            )
            log(f"step {step}/{max_steps} tokens {tokens_seen} train {tl:.4f} val {v:.4f} lr {lr_at(step-1):.2e}")
            if v < best[0] - 1e-3:
                best = (v, step)
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                bad_evals = 0
            else:
                bad_evals += 1
                if bad_evals >= args.patience:
                    stop_reason = "val_loss_flat"
                    break
    train_wall = time.time() - t_train0
    if best_state is not None and best[1] != step:
        log(f"restoring best checkpoint from step {best[1]} (val {best[0]:.4f})")
        model.load_state_dict(best_state)

    # ---- save
    model.eval()
    if args.experts:
        model.config.output_router_logits = False  # inference: logits only
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    # Name the class by its long-standing alias (also loadable by transformers 4.x) and
    # write special_tokens_map.json explicitly (transformers 5 no longer does).
    tc_path = os.path.join(out, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, f, indent=2)
    weights_file = os.path.join(out, "model.safetensors")
    os.chmod(weights_file, 0o644)
    weights_size = os.path.getsize(weights_file)

    # ---- reload from disk and evaluate perplexity on eval.txt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    t2 = AutoTokenizer.from_pretrained(out)
    with open(os.path.join(out, "eval.txt"), encoding="utf-8") as f:
        docs = f.read().rstrip("\n").split("\n\n")
    ids: list[int] = []
    for d in docs:
        ids.extend(t2(d)["input_ids"])  # starts with <s>
        ids.append(t2.eos_token_id)
    ids_np = np.asarray(ids, dtype=np.int64)
    assert np.array_equal(ids_np, eval_stream), "AutoTokenizer disagrees with the training tokenizer"
    tot, cnt = stream_nll(m2, ids_np, L)
    eval_loss = tot / cnt
    ppl = math.exp(eval_loss)
    log(f"eval.txt: {cnt} predicted tokens, loss {eval_loss:.4f}, perplexity {ppl:.3f}")

    prompt = "In the beginning"
    enc = t2(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = m2.generate(**enc, max_new_tokens=40, do_sample=False)
    sample = t2.decode(gen[0], skip_special_tokens=True)
    log(f"sample: {sample!r}")

    total_wall = time.time() - t_start
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    train_log = {
        "seed": args.seed,
        "args": vars(args),
        "command": "python tools/train_reference.py " + " ".join(sys.argv[1:]),
        "data": {
            "source": "King James Bible via Debian bible-kjv (`bible -f gen1:1-rev22:21`)",
            "chapters_total": len(chapters),
            "train_chapters": len(train_ch),
            "eval_chapters": len(eval_ch),
            "eval_chapter_refs": [f"{BOOK_NAMES[c['book']]} {c['chapter']}" for c in eval_ch],
            "holdout_rule": f"chapter_index % {args.holdout_every} == {args.holdout_offset}",
            "train_chars": sum(map(len, train_texts)),
            "eval_chars": len(eval_txt),
            "train_tokens": int(len(train_stream)),
            "eval_tokens": int(len(eval_stream)),
        },
        "tokenizer": {"type": "byte-level BPE", "vocab_size": tok.get_vocab_size(), "special_tokens": SPECIAL_TOKENS,
                      "train_time_s": tok_time},
        "params": n_params,
        "weights_bytes": weights_size,
        "max_steps": max_steps,
        "steps": step,
        "best_step": best[1],
        "stop_reason": stop_reason,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / len(train_stream),
        "train_wall_s": train_wall,
        "total_wall_s": total_wall,
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__, "python": platform.python_version()},
        "curve": curve,
        "best_val_loss": best[0],
        "eval": {"loss": eval_loss, "perplexity": ppl, "predicted_tokens": cnt, "window": L,
                 "method": "non-overlapping windows over concatenated '<s> chapter </s>' stream, fp32"},
        "sample": {"prompt": prompt, "greedy_40_tokens": sample},
    }
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(train_log, f, indent=2)
    write_card(out, train_log, config)
    log(f"done in {total_wall / 60:.1f} min -> {out}")


def write_card(out: str, lg: dict, config) -> None:
    a = lg["args"]
    d = lg["data"]
    curve = lg["curve"]
    pick = curve if len(curve) <= 12 else [curve[i] for i in np.linspace(0, len(curve) - 1, 12).astype(int)]
    rows = "\n".join(
        "| {} | {:,} | {} | {:.3f} | {:.1f} |".format(
            c["step"], c["tokens"], "" if c["train_loss"] is None else "%.3f" % c["train_loss"],
            c["val_loss"], c["elapsed_s"] / 60,
        )
        for c in pick
    )
    note = ""
    if lg["stop_reason"] == "time_budget":
        note = (
            f"\nThis run was cut by the time budget at step {lg['steps']} of {lg['max_steps']} (the calibration "
            f"under-estimated the step time on the shared machine); the last evaluated checkpoint (step "
            f"{lg['best_step']}) is the saved one, and the val loss was still improving slowly.\n"
        )
    card = f"""# llmopt reference model (KJV-Llama, {lg['params'] / 1e6:.1f}M)

A small Llama-architecture causal LM trained from scratch on the King James Bible.
It is llmopt's *reference model*: real trained weights (not random), a real
tokenizer, standard `transformers` `LlamaForCausalLM` layout, small enough to
export/optimize/compare quickly on CPU.  It is **not** meant to be a good
language model.

## Files

| file | content |
|---|---|
| `config.json`, `generation_config.json` | `LlamaConfig` / generation defaults (bos=0, eos=1, pad=3, greedy) |
| `model.safetensors` | fp32 weights ({lg['weights_bytes'] / 1e6:.2f} MB) |
| `tokenizer.json`, `tokenizer_config.json` | byte-level BPE, loads with `AutoTokenizer.from_pretrained` |
| `eval.txt` | held-out chapters ({d['eval_chapters']} chapters, {d['eval_chars']:,} chars), one blank line between chapters |
| `train_log.json` | full settings, loss curve, eval result, sample |

## Architecture

`LlamaForCausalLM`: hidden {config.hidden_size}, {config.num_hidden_layers} layers,
{config.num_attention_heads} attention heads / {config.num_key_value_heads} key-value heads (GQA, head dim {config.head_dim}),
SwiGLU MLP intermediate {config.intermediate_size}, RMSNorm eps {config.rms_norm_eps}, RoPE theta 10000,
max_position_embeddings {config.max_position_embeddings}, vocab {config.vocab_size}, untied input/output embeddings,
no biases.  **{lg['params']:,} parameters**, fp32.

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training split only; vocab {lg['tokenizer']['vocab_size']}.
Special tokens `<s>`=0, `</s>`=1, `<unk>`=2 (never produced, byte-level), `<pad>`=3.
Encoding prepends `<s>` (Llama-style); no prefix space is added.

## Data and split

King James Version (public domain), extracted from Debian's `bible-kjv` /
`bible-kjv-text` packages with `bible -f gen1:1-rev22:21` (31,102 verses,
{d['chapters_total']} chapters); verse references stripped, one verse per line, one document per chapter.
Chapters are indexed 0..{d['chapters_total'] - 1} in canonical order and `{d['holdout_rule']}` is held
out: {d['eval_chapters']} eval chapters ({', '.join(d['eval_chapter_refs'][:3])}, ... see `train_log.json`), {d['train_chapters']} train chapters.
Train: {d['train_chars']:,} chars / {d['train_tokens']:,} tokens; eval: {d['eval_tokens']:,} tokens.
Documents are fed as `<s> chapter </s>` concatenated into one stream.

## Training

AdamW (betas 0.9/0.95, weight decay {a['weight_decay']} on matrices), peak LR {a['lr']}, {a['warmup']} warmup steps,
cosine decay to {a['min_lr_frac']}x over {lg['max_steps']} steps, grad clip 1.0, batch {a['batch_size']} x {a['seq_len']} tokens
(random windows), no dropout, seed {lg['seed']}.  Validation loss on {('the first %d' % a['eval_windows']) if a['eval_windows'] else 'all'} eval windows every
{a['eval_every']} steps; early stop after {a['patience']} evals without improvement; best checkpoint kept.

Ran {lg['steps']} steps ({lg['tokens_seen']:,} tokens, {lg['epochs']:.2f} epochs), stop reason `{lg['stop_reason']}`,
best step {lg['best_step']}.  Training wall time {lg['train_wall_s'] / 60:.1f} min, whole script
{lg['total_wall_s'] / 60:.1f} min, on {lg['cpu']} with `torch.set_num_threads(1)`
(torch {lg['versions']['torch']}, transformers {lg['versions']['transformers']}).

| step | tokens | train loss | val loss | minutes |
|---|---|---|---|---|
{rows}

## Evaluation

Perplexity on `eval.txt` (every chapter encoded as `<s> text </s>`, concatenated,
non-overlapping {lg['eval']['window']}-token windows, fp32, {lg['eval']['predicted_tokens']:,} predicted tokens):

**eval loss {lg['eval']['loss']:.4f} nats/token, perplexity {lg['eval']['perplexity']:.2f}**

Greedy sample, prompt `{lg['sample']['prompt']}`:

> {lg['sample']['greedy_40_tokens'].replace(chr(10), ' / ')}

## Reproduce

```
apt-get install -y bible-kjv          # provides the `bible` command + text
python {lg['command'].split(' ', 1)[1]}
```

The default derives the step count (and so the cosine schedule) from `--minutes` after a
10-step timing calibration, so results depend slightly on machine speed/load.  Add
`--max-steps {lg['max_steps']}` to fix the schedule; the loop still also stops at the `--minutes` budget.
{note}"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)


if __name__ == "__main__":
    main()
