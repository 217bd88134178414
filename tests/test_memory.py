"""The memory model: predicted saved-for-backward bytes against counts of ``saved_tensors_hooks`` on the CPU (tiny
models, both phases, several sizes, batches, precisions, checkpointing), UNI's encoder against the closed forms
derived by hand for the CUDA rules, and the batch-size suggestion."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from cellseg.config import Config, replace, resolve_config
from cellseg.losses import loss_from_config
from cellseg.memory import (
    GPUS,
    DoesNotFit,
    GiB,
    LiveBytes,
    MemoryModel,
    _Tracer,
    build_skeleton,
    effective_batch,
    estimate_memory,
    measure_cuda_saved,
    measure_saved_bytes,
    measure_step_peak,
    measure_step_saved,
    parse_gpu,
    resolve_estimate_precision,
    suggest_batch,
)
from cellseg.model import build_model, build_model_from_config
from cellseg.model.backbones import ViTBackbone
from cellseg.model.decoders import DECODERS
from cellseg.model.network import CellSegModel
from cellseg.optim import build_optimizer, configure_phase, count_params
from cellseg.training.trainer import accumulation_steps

BASE = dict(ENCODER="test_vit", ENCODER_WEIGHTS="", DECODER_WIDTH=16, PATCH_SIZE=64, BATCH_SIZE=2,
            GRAD_ACCUM_TARGET=0, PRECISION="fp32", LORA_R=4, LORA_ALPHA=8, DEVICE="cpu")


def batch_for(b: int, size: int, num_classes: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    fg = torch.rand(b, size, size, generator=g) > 0.5
    return {"image": torch.randn(b, 3, size, size, generator=g), "np": fg.long(),
            "hv": torch.rand(b, 2, size, size, generator=g) * 2 - 1,
            "nc": fg.long() * torch.randint(1, num_classes + 1, (b, size, size), generator=g),
            "ignore": torch.zeros(b, size, size, dtype=torch.bool)}


def measured_and_predicted(cfg: Config, model: nn.Module | None = None, meta: nn.Module | None = None):
    torch.manual_seed(0)
    if model is None:
        model = build_model_from_config(cfg, num_classes=2)
        configure_phase(model, cfg)
    measured = measure_step_saved(model, loss_from_config(cfg, 2), batch_for(cfg.BATCH_SIZE, cfg.PATCH_SIZE),
                                  precision=cfg.PRECISION)
    est = MemoryModel(cfg, num_classes=2, device="cpu", model=meta).estimate()
    return measured, est


CASES = [
    dict(PHASE=1),
    dict(PHASE=2),
    dict(PHASE=2, GRAD_CHECKPOINTING=True),
    dict(PHASE=1, PRECISION="bf16"),
    dict(PHASE=2, PRECISION="bf16", BATCH_SIZE=3),
    dict(PHASE=2, PRECISION="bf16", GRAD_CHECKPOINTING=True),
    dict(PHASE=2, PATCH_SIZE=96, BATCH_SIZE=1),
    dict(PHASE=2, PATCH_SIZE=72),  # padded to 80 for the 16 px patches
    dict(PHASE=1, DECODER="unet_resattn", PRECISION="bf16"),
    dict(PHASE=2, DECODER="unet_resattn"),
    dict(PHASE=2, LORA_BLOCKS="last_half", LORA_TARGETS=["qkv", "fc2"], LORA_DROPOUT=0.0),
    dict(PHASE=2, ENCODER="test_resnet", PRECISION="bf16"),
    dict(PHASE=1, ENCODER="test_resnet"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_predicted_saved_bytes_match_the_measured_ones(case):
    cfg = resolve_config({**BASE, **case})
    measured, est = measured_and_predicted(cfg)
    assert est.saved == pytest.approx(measured["total"], rel=0.01)
    network = est.saved - est.activations_by_part["loss"]
    assert network == pytest.approx(measured["model"], rel=0.01)


def _custom_vit(cfg: Config, device: str = "cpu", **kwargs) -> CellSegModel:
    """A tiny timm ViT with UNI2-style options, wrapped as the cellseg network."""
    with torch.device(device):
        core = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0, dynamic_img_size=True,
            **kwargs)
        backbone = ViTBackbone(core, [0, 2])
        model = CellSegModel(backbone, DECODERS[cfg.DECODER](backbone.family, backbone.out_channels, 2,
                                                             cfg.DECODER_WIDTH), {"encoder": "custom"})
        configure_phase(model, cfg)
    return model


@pytest.mark.parametrize("kwargs", [
    dict(init_values=1e-5),  # LayerScale (UNI)
    dict(reg_tokens=2, no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU,
         init_values=1e-5, mlp_ratio=2.5),  # UNI2-h's block
    dict(mlp_layer=timm.layers.SwiGLU, act_layer=nn.SiLU),
], ids=["layerscale", "uni2-style", "swiglu"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vit_variants_are_replayed(kwargs, precision):
    cfg = resolve_config({**BASE, "PHASE": 2, "PRECISION": precision})
    torch.manual_seed(0)
    measured, est = measured_and_predicted(cfg, _custom_vit(cfg, **kwargs), _custom_vit(cfg, "meta", **kwargs))
    assert est.saved == pytest.approx(measured["total"], rel=0.01)


def _explicit_attention(model: nn.Module) -> nn.Module:
    for blk in model.encoder.core.blocks:
        blk.attn.fused_attn = False  # timm's q @ k^T, softmax, @ v path
    return model


def test_explicit_attention_keeps_the_score_matrix():
    cfg = resolve_config({**BASE, "PHASE": 2, "PATCH_SIZE": 128})
    torch.manual_seed(0)
    real = build_model_from_config(cfg, num_classes=2)
    configure_phase(real, cfg)
    measured, est = measured_and_predicted(cfg, _explicit_attention(real),
                                           _explicit_attention(build_skeleton(cfg, 2)))
    assert est.saved == pytest.approx(measured["total"], rel=0.01)
    fused = MemoryModel(cfg, num_classes=2, device="cpu").estimate()
    assert est.activations_by_part["encoder"] > fused.activations_by_part["encoder"]


# ----- the arithmetic, by hand, for UNI on the CUDA rules
@pytest.fixture(scope="module")
def uni_phase2():
    return MemoryModel(Config(PHASE=2), num_classes=3, device="cuda")


def _uni_encoder_bytes(b: int, precision: str) -> tuple[int, int]:
    """UNI (ViT-L/16, LayerScale) at 256 px, LoRA r=8 on every block's qkv, dropout 0.1, fused SDPA, CUDA autocast.

    Block 0's input needs no gradient (frozen patch embedding), so it keeps less than the others."""
    n, d, h, r, depth = 16 * 16 + 1, 1024, 16, 8, 24
    bnd, bn = b * n * d, b * n
    if precision == "bf16":  # LayerNorm in fp32 on the fp32 residual stream, everything else in bf16
        # LoRA A's bf16 input, q/k/v, attention output, LN2 input (fp32), GELU input (bf16, 4D wide)
        # + flash attention's RNG state: a (2,) seed and an offset, 8 bytes each
        block0 = (2 + 6 + 2 + 4 + 8) * bnd + 2 * bn * r + 4 * b * h * n + 8 * bn + 24
        # + LN1 input (fp32) and the dropout's bool mask
        block = (4 + 1 + 2 + 6 + 2 + 4 + 8) * bnd + 2 * bn * r + 4 * b * h * n + 16 * bn + 24
        # bf16 copies of the frozen qkv, proj, fc1, fc2 weights (and of LoRA B / A where the input needs a gradient)
        casts0 = 2 * (d + 4 * d + 4 * d) * d + 2 * 3 * d * r
        casts = 2 * (3 * d + d + 4 * d + 4 * d) * d + 2 * (3 * d * r + r * d)
        return block0 + (depth - 1) * block, casts0 + (depth - 1) * casts
    lse = 4 * b * h * -(-n // 32) * 32  # memory-efficient attention pads the log-sum-exp to 32
    rng = 8 + 8  # its RNG seed and offset
    block0 = (4 + 12 + 4 + 4 + 16) * bnd + 4 * bn * r + lse + 8 * bn + rng
    block = (4 + 1 + 4 + 12 + 4 + 4 + 16) * bnd + 4 * bn * r + lse + 16 * bn + rng
    return block0 + (depth - 1) * block, 0


@pytest.mark.parametrize("b", [1, 3])
def test_uni_phase2_encoder_matches_the_closed_form(uni_phase2, b):
    est = uni_phase2.estimate(b)
    acts, casts = _uni_encoder_bytes(b, "bf16")
    assert est.activations_by_part["encoder"] == acts
    assert est.saved_by_part["encoder"] - est.activations_by_part["encoder"] == casts
    fp32 = MemoryModel(Config(PHASE=2, PRECISION="fp32"), num_classes=3, device="cuda", model=uni_phase2.model)
    assert fp32.estimate(b).activations_by_part["encoder"] == _uni_encoder_bytes(b, "fp32")[0]


def test_uni_checkpointing_keeps_block_inputs_and_phase1_keeps_nothing(uni_phase2):
    ck = MemoryModel(Config(PHASE=2, GRAD_CHECKPOINTING=True), num_classes=3, device="cuda").estimate(2)
    assert ck.activations_by_part["encoder"] == 24 * 4 * 2 * 257 * 1024  # fp32 residual stream per block
    plain = uni_phase2.estimate(2)
    assert ck.total < plain.total
    p1 = MemoryModel(Config(PHASE=1), num_classes=3, device="cuda").estimate(2)
    assert p1.activations_by_part["encoder"] == 0 and p1.saved_by_part["encoder"] == 0
    assert p1.activations_by_part["decoder"] == plain.activations_by_part["decoder"]


def test_parameters_gradients_and_optimizer_follow_the_trainable_set():
    for phase in (1, 2):
        cfg = resolve_config({**BASE, "PHASE": phase})
        model = build_model_from_config(cfg, num_classes=2)
        configure_phase(model, cfg)
        counts = count_params(model)
        est = MemoryModel(cfg, num_classes=2, device="cpu").estimate()
        n_tensors = sum(p.requires_grad for p in model.parameters())
        assert est.parameters == 4 * counts["total"]
        assert est.gradients == 4 * counts["trainable"]
        assert est.optimizer == 8 * counts["trainable"] + 4 * n_tensors
        assert est.overhead == 0 and est.total == est.allocated and est.buckets == 0
        # the parameters' gradients all exist at the end of backward: the peak is at least that moment's memory
        assert est.transient >= est.gradients - est.saved
    ddp = MemoryModel(cfg, num_classes=2, device="cpu", world_size=2).estimate()
    assert ddp.buckets == est.gradients  # DDP's buckets hold a copy
    assert ddp.allocated == est.allocated + est.gradients


def test_activations_scale_with_the_batch_and_cuda_adds_overhead():
    cfg = resolve_config({**BASE, "PHASE": 2, "PRECISION": "bf16"})
    mm = MemoryModel(cfg, num_classes=2, device="cpu")
    one, four = mm.estimate(1), mm.estimate(4)
    assert four.activations == pytest.approx(4 * one.activations, rel=1e-3)
    assert four.weight_casts == one.weight_casts and four.parameters == one.parameters
    gpu = MemoryModel(cfg, num_classes=2, device="cuda").estimate(1)
    assert gpu.overhead > 0 and gpu.total == gpu.allocated + gpu.overhead
    # CUDA runs GroupNorm in fp32 under autocast: the decoder keeps more than on the CPU
    assert gpu.activations_by_part["decoder"] > one.activations_by_part["decoder"]


def test_estimate_memory_uses_batch_size_and_prints_a_breakdown():
    cfg = resolve_config({**BASE, "BATCH_SIZE": 3})
    est = estimate_memory(cfg, num_classes=2, device="cpu")
    assert est.settings["batch_size"] == 3
    text = str(est)
    for word in ("parameters", "gradients", "optimizer", "batch + outputs", "activations", "weight copies",
                 "backward", "total", "test_vit", "Phase 1"):
        assert word in text


def test_skeleton_matches_build_model():
    for encoder in ("test_vit", "test_resnet"):
        cfg = resolve_config({**BASE, "ENCODER": encoder, "PHASE": 2})
        skel = build_skeleton(cfg, 3)
        real = build_model(encoder, num_classes=3, width=cfg.DECODER_WIDTH)
        configure_phase(real, cfg)
        assert skel.arch_info() == real.arch_info()
        assert {k: v.shape for k, v in skel.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
        assert next(skel.parameters()).is_meta
    uni = build_skeleton(Config(), 3)  # UNI's architecture without its weights file
    assert uni.arch_info()["encoder"] == "uni" and uni.arch_info()["encoder_indices"] == [5, 11, 17, 23]
    assert "encoder.core.blocks.0.ls1.gamma" in uni.state_dict()


# ----- batch suggestion
def test_suggest_batch_picks_the_largest_fitting_divisor_of_the_effective_batch():
    cfg = resolve_config({**BASE, "BATCH_SIZE": 8, "GRAD_ACCUM_TARGET": 16, "PHASE": 2})
    mm = MemoryModel(cfg, num_classes=2)
    need = {b: mm.estimate(b).total for b in (1, 2, 4, 8, 16)}
    assert suggest_batch(cfg, need[4], num_classes=2, memory_model=mm) == (4, 4)
    assert suggest_batch(cfg, need[8] - 1, num_classes=2, memory_model=mm) == (4, 4)
    assert suggest_batch(cfg, need[16], num_classes=2, memory_model=mm) == (16, 1)
    two_gpus = MemoryModel(cfg, num_classes=2, world_size=2)
    assert suggest_batch(cfg, 10 * need[16], num_classes=2, world_size=2, memory_model=two_gpus) == (8, 1)
    no_accum = replace(cfg, GRAD_ACCUM_TARGET=0, BATCH_SIZE=6)
    assert effective_batch(no_accum) == 6
    assert suggest_batch(no_accum, need[2], num_classes=2) == (2, 3)
    with pytest.raises(DoesNotFit, match=r"needs .* GiB with one image per step.*GRAD_CHECKPOINTING=True"):
        suggest_batch(cfg, need[1] - 1, num_classes=2, memory_model=mm)


def test_uni_phase2_on_12gb_keeps_the_effective_batch_and_fits(uni_phase2):
    cfg = Config(PHASE=2)
    b, acc = suggest_batch(cfg, 12 * GiB, num_classes=3, memory_model=uni_phase2)
    assert b * acc == effective_batch(cfg) == 16
    assert uni_phase2.estimate(b).total <= 12 * GiB < uni_phase2.estimate(2 * b).total


# ----- small pieces and their errors
def test_measure_saved_bytes_counts_unique_storages_and_excludes():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    _, n = measure_saved_bytes(lambda: x * x)  # x saved twice: counted once
    assert n == x.numel() * 4
    _, n = measure_saved_bytes(lambda: (x[:2] * x[2:]).sum())  # two views of one storage
    assert n == x.numel() * 4
    _, n = measure_saved_bytes(lambda: x @ w, exclude=[w])
    assert n == x.numel() * 4


def test_parse_gpu_names_and_sizes():
    assert parse_gpu("A100-40GB") == GPUS["a100-40gb"]
    assert not parse_gpu("titan-12gb").bf16 and parse_gpu("h100-80gb").bf16
    assert parse_gpu("12gb").memory_bytes == 12 * GiB and parse_gpu("10.5").memory_bytes == int(10.5 * GiB)
    for bad in ("k80", "0gb", "-3", ""):
        with pytest.raises(ValueError, match="--gpu must be one of"):
            parse_gpu(bad)


def test_precision_resolution_and_its_error():
    assert resolve_estimate_precision("auto", "cuda") == "bf16"
    assert resolve_estimate_precision("auto", "cuda", bf16_supported=False) == "fp32"
    assert resolve_estimate_precision("auto", "cpu") == "fp32"
    assert resolve_estimate_precision("fp16", "cuda") == "fp16"
    with pytest.raises(ValueError, match="PRECISION='fp16' needs a CUDA device"):
        resolve_estimate_precision("fp16", "cpu")


def test_bad_device_is_refused():
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu'"):
        MemoryModel(resolve_config(BASE), num_classes=2, device="tpu")


def test_unsupported_architectures_are_named():
    cfg = resolve_config({**BASE, "PHASE": 2})
    qk = _custom_vit(cfg, "meta", qk_norm=True)
    with pytest.raises(ValueError, match="plain ViT Block.*q_norm"):
        MemoryModel(cfg, num_classes=2, model=qk).estimate()
    normed = _custom_vit(cfg, "meta", embed_norm_layer=nn.LayerNorm)
    with pytest.raises(ValueError, match="patch-embedding norm"):
        MemoryModel(cfg, num_classes=2, model=normed).estimate()
    gelu = build_skeleton(cfg, 2)
    gelu.decoder.neck.stem[0][2] = nn.GELU()
    with pytest.raises(ValueError, match="cannot replay a GELU"):
        MemoryModel(cfg, num_classes=2, model=gelu).estimate()

    class OtherDecoder(nn.Module):
        def __init__(self, neck: nn.Module):
            super().__init__()
            self.neck = neck

    other = build_skeleton(cfg, 2)
    other.decoder = OtherDecoder(other.decoder.neck)
    with pytest.raises(ValueError, match="knows the decoders .* not OtherDecoder"):
        MemoryModel(cfg, num_classes=2, model=other).estimate()


# ----- the whole step's peak: the backward replay against the CPU allocator
PEAK_CASES = [
    dict(PHASE=1),
    dict(PHASE=2),
    dict(PHASE=2, PRECISION="bf16", GRAD_CHECKPOINTING=True),
    dict(PHASE=1, PRECISION="bf16", BATCH_SIZE=3),
    dict(PHASE=2, PATCH_SIZE=72),  # padded to 80 for the 16 px patches
    dict(PHASE=2, DECODER="unet_resattn", PRECISION="bf16"),
    dict(PHASE=2, LORA_BLOCKS="last_half", LORA_TARGETS=["qkv", "fc2"], BATCH_SIZE=1, PATCH_SIZE=96),
    dict(PHASE=2, ENCODER="test_resnet", PRECISION="bf16"),
    dict(PHASE=1, ENCODER="test_resnet"),
    # accumulation: the earlier micro-batches' gradients are there all through the later ones (9 MB for the CNN)
    dict(PHASE=2, ENCODER="test_resnet", GRAD_ACCUM_TARGET=4),
    dict(PHASE=2, PRECISION="bf16", GRAD_ACCUM_TARGET=6),
]


@pytest.mark.parametrize("case", PEAK_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_predicted_peak_matches_the_cpu_allocator(case):
    """Parameters, optimizer states, batch, saved tensors and the replayed backward pass against every allocation
    and free of one training step (torch.profiler), the second step of a training: within 5 %."""
    cfg = resolve_config({**BASE, **case})
    torch.manual_seed(0)
    model = build_model_from_config(cfg, num_classes=2)
    configure_phase(model, cfg)
    accumulation = accumulation_steps(cfg, world_size=1)
    measured = measure_step_peak(model, loss_from_config(cfg, 2), batch_for(cfg.BATCH_SIZE, cfg.PATCH_SIZE),
                                 build_optimizer(model, cfg), precision=cfg.PRECISION, accumulation=accumulation)
    est = MemoryModel(cfg, num_classes=2, device="cpu").estimate()
    assert est.settings["accumulation"] == accumulation
    assert est.held_gradients == (est.gradients if accumulation > 1 else 0)
    assert est.allocated == pytest.approx(measured["peak"], rel=0.05)
    # the forward pass ends with what autograd keeps (and the loss's scalars): the saved-bytes count, again
    assert measured["end_of_forward"] == pytest.approx(est.saved, rel=0.02)
    assert measured["baseline"] < measured["peak"]


def _chain_op(t: _Tracer, x, numel: int, weight: nn.Parameter | None = None):
    t.save(x)  # as an op keeping its input, e.g. a linear layer
    return t.record(t.new((numel,), "f32", True), x, t.param(weight))


def test_backward_replay_frees_saves_and_gradients_in_reverse_order():
    t = _Tracer("cpu", None)
    w = nn.Parameter(torch.zeros(10))  # a 40-byte gradient
    x = t.new((100,), "f32", False)  # the input: kept, no gradient
    a = _chain_op(t, x, 100, w)
    b = _chain_op(t, a, 100)
    c = _chain_op(t, b, 100)
    # end of forward: x, a, b kept (1200 bytes); the loss leaves c's 400-byte gradient. The last op computes b's
    # gradient next to it (800), then c's gradient and b's storage go; the rest only frees.
    assert t.replay_backward([c], loss_peak=0, loss_after=400) == 800
    assert t.replay_backward([c], loss_peak=5000, loss_after=400) == 5000  # the loss's own backward was larger
    assert {n for n, *_ in t.saved.values()} == {400} and len(t.saved) == 3


def test_backward_replay_brings_a_checkpointed_block_back():
    t = _Tracer("cpu", None)
    x = t.new((100,), "f32", False)
    a = _chain_op(t, x, 100, nn.Parameter(torch.zeros(10)))
    t.save(a)  # the checkpoint keeps the block's input ...
    with t.sub():  # ... and its ops' saves are recomputed when the backward reaches the block
        b = _chain_op(t, a, 1000)  # keeps a (already kept: not counted twice)
        c = _chain_op(t, b, 1000)  # keeps b, 4000 bytes, recomputed
    d = _chain_op(t, c, 100)  # keeps c
    assert sum(n for n, *_ in t.saved.values()) == 400 + 400 + 4000  # x, a, c: b is not kept
    # d's backward: its output gradient + c's (4400), then both go with c's storage. At the block: b comes back
    # (4000) and c's gradient makes b's (4000 more): 8000.
    assert t.replay_backward([d], loss_peak=0, loss_after=400) == 8000


def test_live_bytes_counts_new_storages_not_views_of_old_ones():
    old = torch.randn(1000)
    with LiveBytes() as live:
        v = old[:500].view(10, 50)  # a view of a storage that existed before: not counted
        y = old * 2  # 4000 bytes
        z = y + 1  # 4000 bytes
        assert live.live == 8000
        del y
        assert live.live == 4000 and live.peak == 8000
        z.add_(1)  # in place: nothing new
        assert live.live == 4000
    assert v.shape == (10, 50) and z.numel() == 1000


def test_measure_step_peak_refuses_gpu_tensors_with_a_pointer():
    cfg = resolve_config({**BASE, "PHASE": 1})
    model = build_skeleton(cfg, 2)  # meta tensors: not on the CPU
    with pytest.raises(ValueError, match="torch.cuda.max_memory_allocated"):
        measure_step_peak(model, loss_from_config(cfg, 2), batch_for(1, 64), build_optimizer(model, cfg))


# ----- the CUDA rules without a GPU: the real network on fake CUDA tensors, CUDA autocast from PyTorch itself
UNI = dict(ENCODER="uni", ENCODER_WEIGHTS="", GRAD_ACCUM_TARGET=0, LORA_R=8, LORA_ALPHA=16, PATCH_SIZE=256,
           BATCH_SIZE=2, PRECISION="bf16")
CUDA_CASES = [
    dict(UNI, PHASE=2),
    dict(UNI, PHASE=1),
    dict(UNI, PHASE=2, GRAD_CHECKPOINTING=True),
    dict(UNI, PHASE=2, PRECISION="fp32", PATCH_SIZE=224, BATCH_SIZE=1),  # memory-efficient attention, lse padded
    dict(UNI, PHASE=2, PATCH_SIZE=512, BATCH_SIZE=1, LORA_BLOCKS="last_half"),
    dict(UNI, PHASE=2, ENCODER="uni2", PATCH_SIZE=224, BATCH_SIZE=1),  # SwiGLU, register tokens
    dict(BASE, PHASE=2, PRECISION="bf16", DECODER="unet_resattn"),
    dict(BASE, PHASE=2, PRECISION="bf16", ENCODER="test_resnet"),
]


@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items() if k in ("ENCODER", "PHASE", "PRECISION", "PATCH_SIZE", "GRAD_CHECKPOINTING",
                                              "DECODER", "LORA_BLOCKS")))
def test_cuda_rules_match_a_fake_cuda_forward(case):
    """What the replay predicts a GPU keeps (CUDA autocast: LayerNorm / GroupNorm / softmax in fp32, bf16 weight
    copies, flash or memory-efficient attention) against the network itself run on fake CUDA tensors: the network to
    0.01 %, the step within 0.5 % (the loss's per-pixel bytes are counted on the CPU's rules)."""
    cfg = resolve_config(case)
    mm = MemoryModel(cfg, num_classes=3, device="cuda")
    measured = measure_cuda_saved(cfg, 3, model=mm.model)
    est = mm.estimate()
    assert est.saved - est.saved_by_part["loss"] == pytest.approx(measured["model"], rel=1e-4)
    assert est.saved == pytest.approx(measured["total"], rel=0.005)


def test_fake_cuda_forward_with_explicit_attention_and_it_leaves_no_trace():
    cfg = resolve_config(dict(UNI, PHASE=2))
    meta = _explicit_attention(build_skeleton(cfg, 3))
    measured = measure_cuda_saved(cfg, 3, model=meta, fused_attention=False)
    est = MemoryModel(cfg, num_classes=3, device="cuda", model=meta).estimate()
    assert est.saved - est.saved_by_part["loss"] == pytest.approx(measured["model"], rel=1e-4)
    fused = measure_cuda_saved(cfg, 3, model=build_skeleton(cfg, 3))
    assert measured["model"] > fused["model"] + 24 * 2 * 16 * 257 * 257 * 2  # at least the bf16 score matrices
    # the skeleton stays on the meta device, SDPA and CUDA autocast are restored
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert torch.nn.functional.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert not torch.is_autocast_enabled("cuda")


def test_fake_cuda_attention_refuses_a_mask_by_name():
    from cellseg.memory import _fused_sdpa

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="without a mask only"):
        _fused_sdpa(q, q, q, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
