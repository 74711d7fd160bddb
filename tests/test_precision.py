"""bf16 on CPUs (icae.core.precision): detection from /proc/cpuinfo, the refusal where bf16 is emulated, the
fp32 attention used under bf16, and a bf16 training model that agrees with fp32 at step 0. Runs on any CPU:
the CPU's flags are faked where a test needs one kind or the other."""

import pytest
import torch
import torch.nn.functional as F

import icae.core.precision as precision
from icae.core.collate import collate
from icae.core.config import ICAEConfig
from icae.core.model import ICAE
from icae.errors import UserError
from icae.testing import tiny_base_model
from test_model import M, R, V, mixed_examples

AMD_ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
OLD_CPU = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) old\nflags\t\t: fpu avx2 avx512f\n"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Pretend this machine's /proc/cpuinfo reads `text`."""

    def use(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        real = precision.cpu_bf16_flags
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=path: real(path))
        return path

    return use


def test_bf16_flags_are_read_from_cpuinfo(tmp_path):
    for text, flags in [(AMD_ZEN4, ["avx512_bf16"]), (SAPPHIRE, ["amx_bf16", "avx512_bf16"]), (OLD_CPU, [])]:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        assert precision.cpu_bf16_flags(path) == flags
    assert precision.cpu_bf16_flags(tmp_path / "missing") == []  # not Linux: no claim of bf16
    path.write_text(AMD_ZEN4)
    assert precision.cpu_model_name(path) == "AMD EPYC (family 25, model 17)"


def test_bf16_is_refused_where_it_is_emulated_and_auto_picks_fp32_there(cpuinfo):
    cpuinfo(OLD_CPU)
    with pytest.raises(UserError, match=r"--bf16 True: this CPU has no bf16 instructions.*drop --bf16"):
        precision.check_bf16("--bf16 True", "cpu")
    assert precision.resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(UserError, match="--dtype bfloat16: this CPU has no bf16"):
        precision.resolve_dtype("bfloat16", "cpu")
    cpuinfo(AMD_ZEN4)
    precision.check_bf16("--bf16 True", "cpu")
    assert precision.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert precision.resolve_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(UserError, match="unknown --dtype 'half'"):
        precision.resolve_dtype("half", "cpu")


def test_fp32_attention_is_sdpa_in_fp32_also_under_autocast():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 16, generator=g).bfloat16() for _ in range(3))
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).transpose(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = precision.sdpa_fp32_attention(module, q, k, v, None)
        bf16_out, _ = sdpa_attention_forward(module, q, k, v, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16(), atol=0, rtol=0)  # fp32 result, rounded once
    assert not torch.equal(bf16_out, out)  # the bf16 kernel rounds along the way: the two are not the same op


def bf16_training_model(base):
    """What `icae pretrain --bf16 True` builds on a CPU (icae.training.run.build_model): bf16 frozen weights, fp32
    attention, then ICAE on top."""
    base = base.to(torch.bfloat16)
    assert precision.use_fp32_attention(base)
    cfg = ICAEConfig(fixed_mem_size=M, mean_compression_rate=R, position_layout="epl", decoder_mode="shared",
                     lora_r=4, lora_target_modules="all-linear")
    torch.manual_seed(0)
    return ICAE(cfg, base)


def test_bf16_training_model_keeps_fp32_master_weights_and_matches_fp32_at_step_0():
    base = tiny_base_model("llama")
    fp32_base = tiny_base_model("llama")
    model = bf16_training_model(base).train()
    assert base.config._attn_implementation == "sdpa_fp32"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values()), "LoRA and memory: fp32"
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    cfg = model.config
    torch.manual_seed(0)
    reference = ICAE(cfg, fp32_base).train()
    reference.load_state_dict({n: t.float() for n, t in model.state_dict().items()})  # the same weights, in fp32
    batch = collate(mixed_examples(), "epl", M, R, V)
    with torch.no_grad():
        for module in (model, reference):
            module.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_bf16 = model(**batch).loss
        loss_fp32 = reference(**batch).loss
    assert loss_bf16.dtype == torch.float32  # the loss is computed in fp32 (icae.core.losses)
    assert abs(loss_bf16.item() - loss_fp32.item()) / loss_fp32.item() < 0.01
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in trainable.items() if "lora_A" in n)
    assert model.memory_embeddings.weight.grad.abs().sum() > 0


def _pretrain_flags(tmp_path, out):
    import json

    from icae.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    texts = [" ".join(["alpha", "beta", "gamma", "delta"][(i + j) % 4] for j in range(30 + i)) for i in range(12)]
    (tmp_path / "train.json").write_text(json.dumps([{"text": t} for t in texts]))
    return (f"--output_dir {out} --model_name_or_path {model} --train_file {tmp_path}/train.json --eval_strategy no "
            "--lora_r 4 --fixed_mem_size 4 --model_max_length 32 --per_device_train_batch_size 2 --max_steps 2 "
            "--lora_target_modules all-linear --train_decoder True --report_to none --bf16 True --logging_steps 1").split()


def test_pretrain_bf16_is_refused_before_anything_loads_where_bf16_is_emulated(tmp_path, cpuinfo):
    from icae.recipes.pretrain import main as pretrain

    cpuinfo(OLD_CPU)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--bf16 True: this CPU has no bf16 instructions"):
        pretrain(_pretrain_flags(tmp_path, out))
    assert not out.exists()


def test_pretrain_bf16_trains_and_saves_fp32_weights(tmp_path, cpuinfo):
    import json

    from safetensors.torch import load_file

    from icae.recipes.pretrain import main as pretrain

    cpuinfo(AMD_ZEN4)  # on a CPU without bf16 this is slow only for big models: the tiny one takes seconds
    out = tmp_path / "run"
    assert pretrain(_pretrain_flags(tmp_path, out)) == 0
    weights = load_file(out / "icae_weights.safetensors")
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(0 < x < 20 for x in losses)


def test_bf16_weights_under_autocast_compute_what_autocast_computes_with_fp32_weights():
    """`--bf16 True` on a CPU (weights stored in bf16 once) against plain autocast over fp32 weights holding the same
    (bf16-representable) values: the same loss and gradients, since the residual stream stays fp32 in both."""
    model = bf16_training_model(tiny_base_model("llama")).train()
    reference_base = tiny_base_model("llama")
    precision.use_fp32_attention(reference_base)
    torch.manual_seed(0)
    reference = ICAE(model.config, reference_base).train()
    reference.load_state_dict({n: t.float() for n, t in model.state_dict().items()})
    batch = collate(mixed_examples(), "epl", M, R, V)
    results = []
    for module in (model, reference):
        torch.manual_seed(5)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)  # a bf16 residual stream misses this by 3x
    for name in grads_a:  # backward rounds in bf16 in either: within bf16's precision (2^-8) of each other
        if grads_b[name].norm() > 0:
            assert (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm() < 2e-2, name
