"""benchmarks/qa_vs_alternatives.py on tiny models: each source's answers after a shared prefix are those of
`icae eval --task qa` (and of the full-context model's own decoding), the costs add up, the report is written;
icae.core.prompt_compression's substitutes for LLMLingua (its own test skips without the package)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from icae.core.text_context import start_id, text_answers
from icae.recipes.evaluate import qa_answers, qa_triples
from test_finetune import answer_records, answering  # noqa: F401  (the fixture: a tiny model trained to answer)
from test_inference import one_thread  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qa_vs_alternatives.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("qa_vs_alternatives", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _by_context(triples):
    grouped = {}
    for c, p, _ in triples:
        grouped.setdefault(tuple(c), []).append(p)
    return grouped


def test_each_source_answers_as_eval_qa_does(bench, answering):  # noqa: F811
    model = answering
    triples = qa_triples(model, answer_records(), 5120)
    grouped = _by_context(triples)
    got = {s: [] for s in bench.SOURCES if s != "llmlingua"}
    for context, prompts in grouped.items():
        for source in got:
            result = bench.answer_context(model, source, list(context), prompts, max_new_tokens=6)
            got[source] += result["answers"]
            assert len(result["kv_cache_bytes"]) == len(prompts) and all(b > 0 for b in result["kv_cache_bytes"])
            if source == "memory_slots":
                assert result["compress_seconds"] > 0 and result["decoder_context_tokens"] == 8 * 1  # one segment
    assert got["memory_slots"] == qa_answers(model, triples, "memory", max_new_tokens=6)
    assert got["full_context_base"] == qa_answers(model, triples, "full_context", max_new_tokens=6)
    assert got["no_context"] == qa_answers(model, triples, "no_context", max_new_tokens=6)
    bos = start_id(model)
    rows = [[bos] + list(c) + list(p) for c, p, _ in triples]
    assert got["full_context_finetuned"] == text_answers(model, rows, max_new_tokens=6)
    m = model.config.fixed_mem_size
    truncated = [[bos] + list(c)[:m] + list(p) for c, p, _ in triples]  # the slots' count of the context's tokens
    assert got["truncated"] == text_answers(model, truncated, max_new_tokens=6)
    assert got["full_context_finetuned"] != got["full_context_base"]  # the LoRA is read: the rows differ


def test_llmlingua_source_reads_the_compressed_ids(bench, answering):  # noqa: F811
    context, prompt = [70, 71, 72, 73, 74, 75], [80, 81]
    result = bench.answer_context(answering, "llmlingua", context, [prompt], max_new_tokens=4,
                                  llmlingua_ids=[71, 73], llmlingua_seconds=1.5)
    assert result["decoder_context_tokens"] == 2 and result["compress_seconds"] == 1.5
    assert result["answers"] == text_answers(answering, [[start_id(answering), 71, 73, 80, 81]], max_new_tokens=4)


def _row(source, context, answers, budget, fixed=(1.0, 0.5), answer_s=0.1):
    n = len(answers)
    return {"source": source, "context": context, "answers": answers, "references": ["a b"] * n,
            "prompts": ["q"] * n, "compress_seconds": fixed[0], "prefix_seconds": fixed[1],
            "answer_seconds": [answer_s] * n, "kv_cache_bytes": [1000] * n, "kv_tokens": [10] * n,
            "decoder_context_tokens": budget, "context_tokens": 40, "dtype": "bf16"}


def test_summary_costs_and_report(bench, tmp_path):
    rows = [_row("memory_slots", "c1", ["a b"] * 5, 10), _row("memory_slots", "c2", ["x"] * 5, 10),
            _row("no_context", "c1", ["a"] * 5, 0, fixed=(0.0, 0.0)), _row("no_context", "c2", ["a"] * 5, 0, (0.0, 0.0)),
            _row("no_context", "c3", ["a"] * 5, 0)]  # c3 has no memory row: left out of every row
    rows.append(_row("memory_slots", "c1", ["x"] * 5, 10))  # the same context again (overlapping steps): first kept
    summary = bench.summarize(rows)
    assert summary["contexts"] == 2 and summary["questions"] == 10
    mem, none = summary["rows"]
    assert mem["source"] == "memory_slots" and mem["exact_match"] == 0.5 and none["exact_match"] == 0.0
    assert mem["seconds_per_answer_k1"] == pytest.approx(1.5 + 0.1)  # compression + prefill + one answer
    assert mem["seconds_per_answer_k5"] == pytest.approx((1.5 + 5 * 0.1) / 5)  # compressed once, five answers
    assert mem["at_4x_context"]["seconds_per_answer_k1"] == pytest.approx(4 * 1.5 + 0.1)
    assert mem["at_4x_context"]["kv_cache_bytes"] == pytest.approx(1000 + 3 * 10 * 100)  # 100 bytes a token
    assert none["seconds_per_answer_k5"] == pytest.approx(0.1)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.main(["report", "--answers", str(answers), "--output_dir", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["source"] for r in written["rows"]] == ["memory_slots", "no_context"]
    assert set(written["rows"][0]) >= {"source", "exact_match", "token_f1", "rouge_l", "decoder_context_tokens",
                                       "kv_cache_bytes", "seconds_per_answer_k1", "seconds_per_answer_k5"}
    assert (tmp_path / "out" / "f1_vs_budget.png").stat().st_size > 1000
    assert (tmp_path / "out" / "table.md").read_text().startswith("| source |")


# ----------------------------------------------------------------------------- LLMLingua's substitutes


def test_cache_pairs_round_trip_and_the_wrapped_model_matches(answering):  # noqa: F811
    from icae.core.prompt_compression import PairCacheModel, TokenizerEncoding, cache_to_pairs, pairs_to_cache

    tok = answering.tokenizer
    enc = TokenizerEncoding(tok)
    assert enc.decode(enc.encode("the cat sat")) == "the cat sat"
    base = answering.base
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), answering._adapter("disabled"):
        full = base(input_ids=ids, use_cache=True)
        wrapped = PairCacheModel(base)
        first = wrapped(ids[:, :3], attention_mask=torch.ones(1, 3, dtype=torch.long), use_cache=True)
        assert isinstance(first.past_key_values, list) and len(first.past_key_values) == base.config.num_hidden_layers
        pairs = [(k[:, :, :3], v[:, :, :3]) for k, v in first.past_key_values]  # sliced, as LLMLingua does
        second = wrapped(ids[:, 3:], attention_mask=torch.ones(1, 5, dtype=torch.long), past_key_values=pairs,
                         use_cache=True)
    assert torch.allclose(second.logits, full.logits[:, 3:], atol=1e-5)
    assert [t.shape for t in cache_to_pairs(pairs_to_cache(pairs))[0]] == [t.shape for t in pairs[0]]


def test_llmlingua_compresses_offline_with_a_local_model(tmp_path):
    pytest.importorskip("llmlingua")
    from icae.core.prompt_compression import llmlingua_compress, llmlingua_compressor
    from icae.testing import byte_tokenizer, save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny", tokenizer=byte_tokenizer())
    compressor = llmlingua_compressor(folder)
    text = "The quick brown fox jumps over the lazy dog. " * 8
    out = llmlingua_compress(compressor, [text], rate=0.3, tries=2)[0]
    assert out["tokens"] == len(byte_tokenizer()(text, add_special_tokens=False)["input_ids"])
    assert 0 < out["kept_tokens"] < out["tokens"] and out["seconds"] > 0
    assert out["ratio"] == pytest.approx(out["kept_tokens"] / out["tokens"])


def test_learning_rate_search_picks_the_lowest_late_loss(bench):
    def arm(losses):  # logged every 5 steps, as FINETUNE_FLAGS log
        return [{"step": 5 * (i + 1), "loss": x} for i, x in enumerate(losses)] + [{"step": 31, "train_loss": 9.0}]

    arms = {"3e-4": arm([9, 8, 7, 6, 5, 4]),          # steps 20-30: mean (6+5+4)/3 = 5
            "1e-3": arm([9, 2, 2, 4.5, 4.5, 4.5]),    # lowest early, 4.5 late: the late window decides
            "3e-3": arm([9, 1, 1, 1, float("nan"), 1])}  # diverged inside the window: never picked
    lr, scores = bench.pick_learning_rate(arms, search_steps=30)
    assert lr == "1e-3"
    assert scores["3e-4"] == pytest.approx(5.0) and scores["1e-3"] == pytest.approx(4.5)
    assert scores["3e-3"] == float("inf")
    assert bench.search_loss(arm([1, 1]), search_steps=30) == float("inf")  # stopped before the window
    tie = {"1e-3": arm([1] * 6), "3e-4": arm([1] * 6)}
    assert bench.pick_learning_rate(tie, 30)[0] == "3e-4"  # a tie goes to the smaller rate
    with pytest.raises(SystemExit, match="no learning-rate arm"):
        bench.pick_learning_rate({"1e-3": arm([float("inf")] * 6)}, 30)


def test_finetune_step_searches_then_continues_the_best_arm(bench, tmp_path, monkeypatch):
    calls = []

    def fake_finetune(flags, log):  # what icae finetune leaves: metrics.jsonl and checkpoint-N
        out = Path(flags[flags.index("--output_dir") + 1])
        lr, steps = float(flags[flags.index("--learning_rate") + 1]), int(flags[flags.index("--max_steps") + 1])
        calls.append((out.name, steps, "--context_as_text" in flags))
        assert flags[flags.index("--train_file") + 1] == "qa.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": abs(lr - 1e-3) + 1 / s}) + "\n" for s in range(5, steps + 1, 5)))
        (out / f"checkpoint-{steps}").mkdir(exist_ok=True)

    monkeypatch.setattr(bench, "_icae_finetune", fake_finetune)
    args = bench.main.__globals__["argparse"].Namespace(
        work_dir=str(tmp_path), learning_rates="3e-4,1e-3,3e-3", search_steps=10, max_steps=20,
        sources="memory_slots,full_context_finetuned", restore_from="ckpt", bf16="False", train_file="qa.jsonl")
    assert bench.run_finetune(args) == 0
    record = json.loads((tmp_path / "finetune.json").read_text())
    for source, as_text in (("memory_slots", False), ("full_context_finetuned", True)):
        assert record[source]["learning_rate"] == "1e-3"
        assert record[source]["checkpoint"] == str(tmp_path / "lr" / f"{source}-1e-3" / "checkpoint-20")
        mine = [c for c in calls if c[0].startswith(source)]
        assert mine == [(f"{source}-3e-4", 10, as_text), (f"{source}-1e-3", 10, as_text),
                        (f"{source}-3e-3", 10, as_text), (f"{source}-1e-3", 20, as_text)]


def test_all_step_wires_the_steps_together(bench, tmp_path, monkeypatch):
    calls = []

    def fake_finetune(args):
        calls.append(("finetune", args.sources, args.max_steps))
        (Path(args.work_dir) / "finetune.json").write_text(json.dumps(
            {s: {"checkpoint": f"{s}-ckpt"} for s in ("memory_slots", "full_context_finetuned")}))
        return 0

    def fake_answers(args):
        calls.append(("answer", args.sources, args.checkpoint, args.text_checkpoint, args.base_checkpoint,
                      args.wrong_contexts, args.llmlingua, Path(args.output).name))
        row = {"source": "memory_slots", "context": "c", "answers": ["a"], "references": ["a"], "compress_seconds": 1.0,
               "prefix_seconds": 0.0, "answer_seconds": [1.0], "kv_cache_bytes": [10], "kv_tokens": [1],
               "decoder_context_tokens": 8, "context_tokens": 32, "dtype": "fp32"}
        bench.append_jsonl(Path(args.output), row)
        return 0

    monkeypatch.setattr(bench, "run_finetune", fake_finetune)
    monkeypatch.setattr(bench, "run_llmlingua", lambda args: calls.append(("llmlingua", args.rate, args.model_name_or_path)) or 0)
    monkeypatch.setattr(bench, "run_answers", fake_answers)
    monkeypatch.setattr(bench, "run_report", lambda args: calls.append(("report", args.answers)) or 0)
    out = tmp_path / "results"
    assert bench.main(["all", "--work_dir", str(tmp_path), "--output_dir", str(out), "--max_steps", "7",
                       "--model_name_or_path", "scorer",
                       "--restore_from", "base-ckpt"]) == 0
    assert calls[0] == ("finetune", "memory_slots,full_context_finetuned", 7)
    assert calls[1] == ("llmlingua", 4, "scorer")
    assert calls[2] == ("answer", ",".join(bench.SOURCES), "memory_slots-ckpt", "full_context_finetuned-ckpt",
                        "base-ckpt", False, str(tmp_path / "llmlingua.jsonl"), "answers.jsonl")
    assert calls[3][1:6] == ("memory_slots", "memory_slots-ckpt", "full_context_finetuned-ckpt", "base-ckpt", True)
    assert calls[4] == ("report", [str(tmp_path / "answers.jsonl")])
    control = json.loads((out / "control_wrong_contexts.json").read_text())
    assert control["rows"][0]["source"] == "memory_slots" and control["rows"][0]["token_f1"] == 1.0


def test_curve_scores_each_checkpoint(bench, tmp_path):
    def answers(path, hyps):
        for i, h in enumerate(hyps):
            bench.append_jsonl(path, {"source": "memory_slots", "context": str(i), "answers": [h],
                                      "references": ["return the sum"]})
    answers(tmp_path / "a10.jsonl", ["nothing here", "nothing"])
    answers(tmp_path / "a20.jsonl", ["return the sum", "nothing"])
    (tmp_path / "results.json").write_text(json.dumps({"rows": [{"source": "memory_slots", "token_f1": 0.5},
                                                                {"source": "truncated", "token_f1": 0.4}]}))
    assert bench.main(["curve", "--answers", f"20={tmp_path / 'a20.jsonl'}", f"10={tmp_path / 'a10.jsonl'}",
                       "--results", str(tmp_path / "results.json"), "--output_dir", str(tmp_path / "out")]) == 0
    curve = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert [p["step"] for p in curve["memory_slots"]] == [10, 20]
    assert curve["memory_slots"][0]["token_f1"] == 0.0 and curve["memory_slots"][1]["token_f1"] == pytest.approx(0.5)
    assert curve["other_rows"] == {"truncated": 0.4} and (tmp_path / "out" / "curve.png").stat().st_size > 0


def test_all_step_scores_llmlingua_with_the_checkpoints_base_model(bench, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "icae_config.json").write_text(json.dumps({"model_name_or_path": "some/base-model"}))
    seen = []
    monkeypatch.setattr(bench, "run_finetune", lambda args: (Path(args.work_dir) / "finetune.json").write_text(
        json.dumps({s: {"checkpoint": s} for s in ("memory_slots", "full_context_finetuned")})))
    monkeypatch.setattr(bench, "run_llmlingua", lambda args: seen.append(args.model_name_or_path))
    monkeypatch.setattr(bench, "run_answers", lambda args: bench.append_jsonl(Path(args.output), {
        "source": "memory_slots", "context": "c", "answers": ["a"], "references": ["b"], "compress_seconds": 0.0,
        "prefix_seconds": 0.0, "answer_seconds": [1.0], "kv_cache_bytes": [1], "kv_tokens": [1],
        "decoder_context_tokens": 1, "context_tokens": 4, "dtype": "fp32"}))
    monkeypatch.setattr(bench, "run_report", lambda args: 0)
    bench.main(["all", "--work_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--restore_from", str(ckpt)])
    assert seen == ["some/base-model"]
