"""`icae finetune` on tiny models: restoring a pretrain checkpoint, resume, bad inputs; answering from
memory slots (`generate`, `icae generate --context`, `icae eval --task qa`) on a model trained to answer."""

import json
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from icae.core.collate import collate
from icae.core.config import ICAEConfig
from icae.core.inference import compress, generate
from icae.core.model import ICAE
from icae.core.qa_examples import FTExampleConfig, answer_ids, ft_example, prompt_part_ids
from icae.errors import UserError
from icae.recipes.finetune import build_ft_datasets, finetune_config, given_flags, parse_args
from icae.recipes.finetune import main as finetune
from icae.recipes.pretrain import main as pretrain
from icae.testing import byte_tokenizer, save_tiny_model
from test_inference import one_thread  # noqa: F401  (the fixture: one thread for tiny matrices)
from test_inference import save_sharp_base_model, sharp_base_model
from test_qa_examples import BOS_TEMPLATE

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def qa_records(n, offset=0):
    """Contexts of a few words; the question asks for one of them, so the answer is in the context only."""
    out = []
    for i in range(offset, offset + n):
        words = [WORDS[(i * 5 + j) % len(WORDS)] for j in range(6)]
        k = i % 3
        out.append({"input": " ".join(words) + f" #{i}", "prompt": f"Word {k + 1}?", "answer": words[k]})
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model = save_tiny_model(root / "tiny")
    save_tiny_model(root / "other", hidden_size=32)
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(12)]
    (root / "texts.json").write_text(json.dumps(texts))
    (root / "train.json").write_text(json.dumps(qa_records(16)))
    (root / "eval.json").write_text(json.dumps(qa_records(4, offset=100)))
    # the checkpoint fine-tuning starts from: 2 real steps, so its weights are not an ICAE's initial ones
    assert pretrain(shlex.split(
        f"--model_name_or_path {model} --train_file {root}/texts.json --output_dir {root}/pre --position_layout epl "
        "--fixed_mem_size 4 --mean_compression_rate 4 --lora_r 4 --model_max_length 32 --max_steps 2 "
        "--learning_rate 1e-2 --eval_strategy no --save_strategy no --report_to none")) == 0
    return root


def ft_flags(root, out, extra=""):
    return shlex.split(f"--restore_from {root}/pre --train_file {root}/train.json --eval_file {root}/eval.json "
                       f"--output_dir {out} --max_context_length 48 --model_max_length 32 --report_to none "
                       f"--per_device_train_batch_size 4 --per_device_eval_batch_size 4 {extra}")


def weights(path):
    return load_file(path / "icae_weights.safetensors")


# ----------------------------------------------------------------------------- the recipe


def test_finetune_starts_from_the_pretrained_weights(ws, tmp_path):
    """With a learning rate of 0 the two steps change nothing: the result is the restored checkpoint, bit for bit
    (a model that was not restored would have an initial ICAE's LoRA and memory embeddings instead)."""
    out = tmp_path / "lr0"
    assert finetune(ft_flags(ws, out, "--max_steps 2 --learning_rate 0 --eval_strategy no --save_strategy no")) == 0
    pre, tuned = weights(ws / "pre"), weights(out)
    assert pre.keys() == tuned.keys()
    for key in pre:
        assert torch.equal(pre[key], tuned[key]), key


def test_two_step_finetune_takes_the_checkpoints_config_and_resumes(ws, tmp_path, capsys):
    out = tmp_path / "run"
    flags = "--learning_rate 1e-2 --eval_strategy steps --eval_steps 2 --eval_qa_samples 3 --save_steps 2 " \
            "--logging_steps 1"
    assert finetune(ft_flags(ws, out, f"--max_steps 2 {flags}")) == 0
    printed = capsys.readouterr().out
    assert "train examples: 16 | eval examples: 4 | restored from:" in printed
    config = json.loads((out / "icae_config.json").read_text())
    pre = json.loads((ws / "pre" / "icae_config.json").read_text())
    for key in ("position_layout", "fixed_mem_size", "mean_compression_rate", "lora_r", "decoder_mode", "lora_config"):
        assert config[key] == pre[key], key  # from the checkpoint, not the flags' defaults (m=128, default layout)
    assert config["training"]["task"] == "ft" and config["training"]["max_context_length"] == 48
    assert config["training"]["restored_from"] == str(ws / "pre")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(0.0 <= r[k] <= 1.0 for r in evals for k in ("eval_exact_match", "eval_token_f1",
                                                                        "eval_rouge1", "eval_rougeL"))
    assert any(weights(out)[k].ne(weights(ws / "pre")[k]).any() for k in weights(out))  # it did train
    # the same command with more steps resumes from the last complete checkpoint
    assert finetune(ft_flags(ws, out, f"--max_steps 3 {flags}")) == 0
    assert f"resume: {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def test_fused_lora_and_checkpointing_policies_train_the_same_step(ws, tmp_path, monkeypatch):
    """--lora_impl fused with selective or full checkpointing takes the step PEFT's LoRA takes without
    checkpointing (dropout 0, SGD: the update is the gradient), the Trainer applies the policy given, and the
    weights are saved under PEFT's names."""
    used = []
    enable = ICAE.activation_checkpointing_enable

    def spy(self, *args, **kwargs):
        enable(self, *args, **kwargs)
        used.append((self.config.lora_impl, self.checkpoint_policy, self.base.is_gradient_checkpointing))

    monkeypatch.setattr(ICAE, "activation_checkpointing_enable", spy)
    common = "--max_steps 1 --optim sgd --learning_rate 0.5 --lora_dropout 0 --eval_strategy no --save_strategy no"
    runs = {"peft": "", "selective": "--lora_impl fused --gradient_checkpointing_policy selective",
            "full": "--lora_impl fused --gradient_checkpointing_policy full"}
    for name, extra in runs.items():
        assert finetune(ft_flags(ws, tmp_path / name, f"{common} {extra}")) == 0
    assert used == [("fused", "selective", True), ("fused", "full", True)]
    assert json.loads((tmp_path / "full" / "icae_config.json").read_text())["lora_impl"] == "fused"
    pre, peft = weights(ws / "pre"), weights(tmp_path / "peft")
    assert any((peft[k] - pre[k]).abs().max() > 1e-3 for k in pre if "lora_A" in k)  # the step moved LoRA
    for name in ("selective", "full"):
        fused = weights(tmp_path / name)
        assert fused.keys() == peft.keys()
        for key in peft:
            torch.testing.assert_close(fused[key], peft[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_the_decoder_mode_is_the_checkpoints_unless_a_flag_says_otherwise(ws):
    def config(extra):
        argv = shlex.split(f"--restore_from {ws}/pre {extra}")
        return finetune_config(parse_args(argv)[0], given_flags(argv))

    assert config("").decoder_mode == "frozen" and config("").position_layout == "epl"
    assert config("--decoder_mode shared").decoder_mode == "shared"
    assert config("--train_decoder True").decoder_mode == "shared"
    assert config("--fixed_mem_size 4 --use_my_pe True --lora-r=4").fixed_mem_size == 4  # agreeing flags are fine
    assert given_flags(["--lora-r=4", "--x", "1", "value"]) == {"lora_r", "x"}


def test_restore_from_takes_a_shipped_checkpoints_name(tmp_path, monkeypatch):
    """`--restore_from smollm2-135m-icae` means the shipped folder (as `--checkpoint` does elsewhere),
    its layout and sizes are taken; a checkpoint folder of that name in the working directory would win, a
    folder without icae_config.json does not (issue 31)."""
    from icae.core.config import SHIPPED_DIR, ICAEConfig, shipped_checkpoints

    name = "smollm2-135m-icae"
    assert name in shipped_checkpoints()
    monkeypatch.chdir(tmp_path)
    argv = ["--restore_from", name]
    model_args = parse_args(argv)[0]
    assert model_args.restore_from == str(SHIPPED_DIR / name)
    saved, _ = ICAEConfig.load(SHIPPED_DIR / name)
    config = finetune_config(model_args, given_flags(argv))
    assert (config.position_layout, config.fixed_mem_size, config.lora_r) == \
        (saved.position_layout, saved.fixed_mem_size, saved.lora_r)
    (tmp_path / name).mkdir()
    assert parse_args(argv)[0].restore_from == str(SHIPPED_DIR / name)
    (tmp_path / name / "icae_config.json").write_text("{}")
    assert parse_args(argv)[0].restore_from == name


def test_templated_tokenizer_rows(ws):
    tok = byte_tokenizer()
    tok.chat_template = BOS_TEMPLATE
    record = {"input": "alpha beta", "prompt": "Word 1?", "answer": "alpha"}
    train, evaluation = build_ft_datasets([record], [], tok, FTExampleConfig(), cache=False)
    example = train[0]
    assert tok.decode(example["target_ids"]) == "<user>Word 1?</user><assistant>alpha<eos>"
    assert tok.decode([t for t in example["target_labels"] if t != -100]) == "alpha<eos>"
    assert len(evaluation) == 0


# ----------------------------------------------------------------------------- bad inputs


BAD = {
    "no-restore": ("--restore_from ''", r"icae finetune needs --restore_from: the output folder"),
    "restore-missing": ("--restore_from {ws}/nowhere", r"--restore_from .*nowhere does not exist"),
    "restore-not-a-checkpoint": ("--restore_from {ws}/tiny", r"tiny is not an ICAE checkpoint: icae_config.json is "
                                 r"missing"),
    "contradicting-flags": ("--lora_r 8 --position_layout default",
                            r"--restore_from .*pre was pretrained with --position_layout 'epl' \(this run: 'default'\); "
                            r"--lora_r 4 \(this run: 8\): fine-tuning takes the layout, m, r and LoRA config from the "
                            r"checkpoint; leave those flags out"),
    "use-my-pe-contradicts": ("--use_my_pe False", r"was pretrained with --position_layout 'epl' \(this run: 'default'\)"),
    "other-base-model": ("--model_name_or_path {ws}/other",
                         r"--restore_from .*pre was trained on another base model .*hidden size 64.*hidden size 32"),
    "separate-decoder": ("--decoder_mode separate",
                         r"--restore_from .*pre does not fit this run: it was trained with --decoder_mode frozen "
                         r"\(this run: separate\)"),
    "missing-field": ("--train_file {ws}/bad-missing.json",
                      r'bad-missing.json: item 1 has no "answer" string; every item needs "input" \(the context\)'),
    "empty-answer": ("--train_file {ws}/bad-empty.json", r'bad-empty.json: item 0 has an empty "answer"'),
    "eval-qa-samples": ("--eval_qa_samples -1", r"--eval_qa_samples must not be negative"),
    "context-length": ("--max_context_length 0", r"--max_context_length must be at least 1"),
    "unknown-flag": ("--lm_ratio 0.5", r"unknown flag --lm_ratio; see `icae finetune --help`"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line_before_any_model_loads(ws, tmp_path, monkeypatch, name):
    import icae.core.base_model

    (ws / "bad-missing.json").write_text(json.dumps([qa_records(1)[0], {"input": "c", "prompt": "p"}]))
    (ws / "bad-empty.json").write_text(json.dumps([{"input": "c", "prompt": "p", "answer": ""}]))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(icae.core.base_model, "load_base_model", no_loading)
    monkeypatch.setattr(icae.core.base_model, "load_tokenizer", no_loading)
    flags, message = BAD[name]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message) as err:
        finetune(ft_flags(ws, out, flags.format(ws=ws)))
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_cli_prints_one_error_line(ws, tmp_path):
    (ws / "bad-empty.json").write_text(json.dumps([{"input": "c", "prompt": "p", "answer": ""}]))
    argv = ft_flags(ws, tmp_path / "out", f"--train_file {ws}/bad-empty.json")
    proc = subprocess.run([sys.executable, "-m", "icae", "finetune", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and 'item 0 has an empty "answer"' in errors[0], proc.stderr[-2000:]


# ----------------------------------------------------------------------------- answering from memory

CONTEXTS = ["the cat sat down", "red fox ran far", "we eat hot soup", "big dogs bark"]
QUESTIONS = ["first word?", "second word?"]  # the same questions for every context: only the slots tell the answer


def answer_records():
    return [{"input": c, "prompt": q, "answer": c.split()[k]} for c in CONTEXTS for k, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def answering(tmp_path_factory):
    """An ICAE (epl, m=8, r=2, shared decoder) trained with plain AdamW until it answers every question exactly."""
    base_dir = save_sharp_base_model(tmp_path_factory.mktemp("sharp-base"))
    torch.manual_seed(0)
    cfg = ICAEConfig(model_name_or_path=base_dir, fixed_mem_size=8, mean_compression_rate=2, position_layout="epl",
                     decoder_mode="shared", lora_r=8, lora_dropout=0.0)
    tok = byte_tokenizer()
    model = ICAE(cfg, sharp_base_model(), tok)
    examples = [ft_example(tok(r["input"], add_special_tokens=False)["input_ids"], prompt_part_ids(tok, r["prompt"]),
                           answer_ids(tok, r["answer"]), tok.eos_token_id, FTExampleConfig())
                for r in answer_records()]
    batch = collate(examples, "epl", 8, 2, model.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(150):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.1, f"training did not converge (loss {loss.item():.3f})"
    return model.eval()


class EncoderCalls:
    """Counts ICAE.encode calls and the segment rows they encode."""

    def __init__(self, monkeypatch):
        self.calls, self.rows = 0, 0
        encode = ICAE.encode

        def counted(model, encoder_input_ids, *args, **kwargs):
            self.calls += 1
            self.rows += encoder_input_ids.shape[0]
            return encode(model, encoder_input_ids, *args, **kwargs)

        monkeypatch.setattr(ICAE, "encode", counted)


def test_one_compression_answers_many_prompts(answering, monkeypatch):
    calls = EncoderCalls(monkeypatch)
    memory = answering.compress(CONTEXTS[0])
    answers = answering.generate(memory, prompt=QUESTIONS)  # one memory, several prompts: the slots are reused
    answers += [answering.generate(memory, prompt=q)[0] for q in QUESTIONS]  # and again, one prompt at a time
    assert calls.calls == 1
    assert answers == ["the", "cat", "the", "cat"]
    # every context, every question: a list gives one prompt per memory
    memory = compress(answering, CONTEXTS)
    assert generate(answering, memory, prompt=QUESTIONS[1]) == [c.split()[1] for c in CONTEXTS]
    assert calls.calls == 2


def _greedy_plain(base, row, steps, eos):
    """Greedy decoding by the plain HF model, without a cache: the reference for the baselines."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            token = int(base(input_ids=torch.tensor([row + out])).logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


def test_eval_qa_three_ways(answering, monkeypatch):
    from icae.recipes.evaluate import evaluate_qa, format_qa_table, qa_answers, qa_triples

    calls = EncoderCalls(monkeypatch)
    records = answer_records()
    results = evaluate_qa(answering, records, max_new_tokens=6, batch_size=3)
    assert calls.rows == len(CONTEXTS)  # each distinct context compressed once for its two questions
    assert results["num_examples"] == 8 and results["num_contexts"] == 4
    assert results["memory"] == {"exact_match": 1.0, "token_f1": 1.0, "rouge1": 1.0, "rougeL": 1.0}
    # the baselines are the base model without LoRA reading [BOS, context, prompt] and [BOS, prompt]
    tok, base = answering.tokenizer, sharp_base_model()
    triples = qa_triples(answering, records, 5120)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for source, row in (("full_context", lambda c, p: [bos] + c + p), ("no_context", lambda c, p: [bos] + p)):
        expected = [_greedy_plain(base, row(c, p), 6, eos) for c, p, _ in triples]
        assert qa_answers(answering, triples, source, max_new_tokens=6, batch_size=3) == expected, source
        hyps = [t.strip() for t in tok.batch_decode(expected, skip_special_tokens=True)]
        assert results[source]["exact_match"] == pytest.approx(
            sum(h == r["answer"] for h, r in zip(hyps, records)) / 8)
    table = format_qa_table(results).splitlines()
    assert table[0] == "| answer from | exact_match | token_f1 | rouge1 | rougeL |"
    assert table[2] == "| memory slots | 1.000 | 1.000 | 1.000 | 1.000 |"
    assert table[3].startswith("| full context (base model) |") and table[4].startswith("| no context (base model) |")


def test_wrong_contexts_pairs_every_question_with_another_context():
    from icae.recipes.evaluate import with_wrong_contexts

    records = [{"input": c, "prompt": f"q{i}", "answer": f"a{i}"} for i, c in enumerate("AABCCC")]
    wrong = with_wrong_contexts(records)
    assert [r["input"] for r in wrong] == list("BBCAAA")
    assert [(r["prompt"], r["answer"]) for r in wrong] == [(r["prompt"], r["answer"]) for r in records]
    assert all(w["input"] != r["input"] for w, r in zip(wrong, records))
    with pytest.raises(UserError, match="needs questions about at least 2 different contexts"):
        with_wrong_contexts(records[:2])


def test_eval_and_generate_commands(answering, tmp_path, monkeypatch, capsys):
    from icae.recipes.evaluate import main as eval_main
    from icae.recipes.use import main as use_main

    ckpt = tmp_path / "ckpt"
    answering.training_info = {"task": "ft", "max_context_length": 64}
    answering.save_pretrained(ckpt)
    (tmp_path / "qa.json").write_text(json.dumps(answer_records()))
    assert eval_main(["--checkpoint", str(ckpt), "--task", "qa", "--eval_file", str(tmp_path / "qa.json"),
                      "--max_new_tokens", "6", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "--max_context_length 64 (the checkpoint's fine-tuning length)" in printed
    assert "| memory slots | 1.000 | 1.000 | 1.000 | 1.000 |" in printed
    saved = json.loads((ckpt / "qa_eval_results.json").read_text())
    assert saved["memory"]["exact_match"] == 1.0 and saved["samples"][0]["memory"] == "the"

    # the control: other contexts, the slots row only; a model that reads its slots now gets the answers wrong
    assert eval_main(["--checkpoint", str(ckpt), "--task", "qa", "--eval_file", str(tmp_path / "qa.json"),
                      "--max_new_tokens", "6", "--device", "cpu", "--sources", "memory", "--wrong_contexts",
                      "--output", str(tmp_path / "wrong.json")]) == 0
    wrong = json.loads((tmp_path / "wrong.json").read_text())
    assert wrong["wrong_contexts"] and "full_context" not in wrong and "no_context" not in wrong
    assert wrong["memory"]["exact_match"] < 0.5
    assert "| full context" not in capsys.readouterr().out
    with pytest.raises(UserError, match="--sources 'memory,slots': each must be one of memory, full_context"):
        eval_main(["--checkpoint", str(ckpt), "--task", "qa", "--sources", "memory,slots"])

    calls = EncoderCalls(monkeypatch)
    (tmp_path / "context.md").write_text(CONTEXTS[1])  # any text file is one context, read whole
    argv = ["--checkpoint", str(ckpt), "--context", str(tmp_path / "context.md"), "--prompt", QUESTIONS[0],
            "--prompt", QUESTIONS[1], "--max_new_tokens", "6", "--device", "cpu"]
    assert use_main(argv, command="generate") == 0
    assert calls.calls == 1
    assert capsys.readouterr().out.splitlines() == ["> first word?", "red", "> second word?", "fox"]
    assert use_main(argv + ["--json"], command="generate") == 0
    assert json.loads(capsys.readouterr().out) == [{"prompt": "first word?", "answers": ["red"]},
                                                   {"prompt": "second word?", "answers": ["fox"]}]
    with pytest.raises(UserError, match="either a slots file or --context FILE"):
        use_main(["--checkpoint", str(ckpt), "--prompt", "q"], command="generate")
    with pytest.raises(UserError, match="--context .*nowhere.md does not exist"):
        use_main(["--checkpoint", str(ckpt), "--context", str(tmp_path / "nowhere.md")], command="generate")
    answering.training_info = {}
