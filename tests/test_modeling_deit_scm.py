"""Tests of the DeiT-SCM configuration and model (tiny configs, CPU, offline)."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
import torch.nn.functional as F

from deit_scm_cxr.hub.configuration_deit_scm import BACKBONE_PRESETS, SCM_SOLVERS, DeiTSCMConfig
from deit_scm_cxr.hub.modeling_deit_scm import (
    DeiTSCMForImageClassification,
    DeiTSCMModel,
    interpolate_position_embeddings,
    select_class_maps,
    token_distances,
)
from deit_scm_cxr.hub.scm_diffusion import DeiTSCMSpatialCalibration, GridOperator, minmax_normalize, resolve_solver
from deit_scm_cxr.hub.scm_diffusion import grid_laplacian as model_grid_laplacian
from remote_code import run_outside_repo


def tiny_config(**overrides) -> DeiTSCMConfig:
    values = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    values.update(overrides)
    return DeiTSCMConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> DeiTSCMForImageClassification:
    torch.manual_seed(seed)
    return DeiTSCMForImageClassification(tiny_config(**overrides))


# ----------------------------------------------------------------------------- configuration


class TestConfig:
    def test_defaults_are_three_cxr_labels(self):
        config = DeiTSCMConfig()
        assert config.num_labels == 3
        assert config.id2label == {0: "Atelectasis", 1: "Other_pathologies", 2: "No_pathologies"}
        assert config.label2id["No_pathologies"] == 2

    @pytest.mark.parametrize(
        "overrides, field",
        [
            (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
            (dict(image_size=30, patch_size=8), "image_size"),
            (dict(scm_attention_layers="first"), "scm_attention_layers"),
            (dict(scm_connectivity=6), "scm_connectivity"),
            (dict(scm_solver="lu"), "scm_solver"),
            (dict(scm_iterations=0), "scm_iterations"),
            (dict(scm_first_block_iterations=-2), "scm_first_block_iterations"),
            (dict(class_weights=[1.0, 2.0]), "class_weights"),
            (dict(label_smoothing=1.5), "label_smoothing"),
        ],
    )
    def test_invalid_values_name_the_field(self, overrides, field):
        with pytest.raises(ValueError, match=field):
            tiny_config(**overrides)

    def test_unknown_preset_names(self):
        with pytest.raises(ValueError, match="backbone"):
            DeiTSCMConfig.from_preset("deit-huge")
        with pytest.raises(ValueError, match="scm_variant"):
            DeiTSCMConfig.from_preset("deit-tiny", scm_variant="fancy")

    def test_presets(self):
        paper = DeiTSCMConfig.from_preset("deit-small", "paper")
        assert (paper.hidden_size, paper.num_attention_heads, paper.intermediate_size) == (384, 6, 1536)
        assert paper.scm_attention_layers == "all"
        assert (paper.scm_lambda_init, paper.scm_beta_init) == (1.0, 0.5)
        assert (paper.scm_num_blocks, paper.scm_first_block_iterations, paper.scm_iterations) == (4, 16, 4)
        cxr = DeiTSCMConfig.from_preset("deit-base", "cxr", image_size=256)
        assert (cxr.hidden_size, cxr.num_hidden_layers, cxr.image_size) == (768, 12, 256)
        assert cxr.scm_attention_layers == "last"
        assert (cxr.scm_lambda_init, cxr.scm_beta_init) == (2.0, 0.1)
        assert (cxr.scm_first_block_iterations, cxr.scm_iterations) == (4, 4)
        assert cxr.class_weights == [0.7045, 0.1181, 0.1774] and cxr.label_smoothing == 0.1
        assert BACKBONE_PRESETS["deit-tiny"]["hidden_size"] == 192

    def test_save_load_round_trip(self, tmp_path):
        config = DeiTSCMConfig.from_preset("deit-tiny", "cxr")
        config.save_pretrained(tmp_path)
        loaded = DeiTSCMConfig.from_pretrained(tmp_path)
        assert loaded.to_dict() == config.to_dict()


# ----------------------------------------------------------------------------- shapes


class TestShapes:
    @pytest.mark.parametrize("channels", [1, 3])
    @pytest.mark.parametrize("size", [(32, 32), (48, 40)])
    @pytest.mark.parametrize("training", [False, True])
    def test_every_output_shape(self, channels, size, training):
        model = tiny_model()
        model.train(training)
        pixels = torch.randn(2, channels, *size)
        out = model(pixels, labels=torch.tensor([0, 2]), output_hidden_states=True)
        grid = (size[0] // 8, size[1] // 8)
        assert out.loss.shape == ()
        assert out.logits.shape == (2, 3)
        assert out.coupled_maps.shape == (2, 3, *grid)
        assert out.attention_maps.shape == (2, *grid)
        assert out.semantic_maps.shape == (2, 3, *grid)
        if training:
            assert out.calibrated_attention_maps.shape == (2, *grid)
        else:
            assert out.calibrated_attention_maps is None
        assert len(out.hidden_states) == 3
        assert all(h.shape == (2, 1 + grid[0] * grid[1], 32) for h in out.hidden_states)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)

    def test_one_channel_model(self):
        model = tiny_model(num_channels=1).eval()
        assert model(torch.randn(2, 1, 32, 32)).logits.shape == (2, 3)
        with pytest.raises(ValueError, match="channels"):
            model(torch.randn(2, 3, 32, 32))

    def test_grayscale_input_equals_repeated_rgb(self):
        model = tiny_model().eval()
        gray = torch.randn(2, 1, 32, 32)
        torch.testing.assert_close(model(gray).logits, model(gray.repeat(1, 3, 1, 1)).logits)

    def test_base_model_output(self):
        torch.manual_seed(0)
        model = DeiTSCMModel(tiny_config()).eval()
        out = model(torch.randn(2, 3, 48, 32))
        assert out.last_hidden_state.shape == (2, 1 + 6 * 4, 32)
        assert out.cls_attention.shape == (2, 6, 4)
        # Sum over 2 layers of softmax rows restricted to the patches: in (0, 2).
        assert (out.cls_attention > 0).all() and (out.cls_attention.sum(dim=(1, 2)) < 2).all()

    def test_position_embedding_interpolation_identity_and_prefix(self):
        position = torch.randn(1, 1 + 16, 8)
        assert interpolate_position_embeddings(position, (4, 4), (4, 4)) is position
        resized = interpolate_position_embeddings(position, (4, 4), (6, 5))
        assert resized.shape == (1, 1 + 30, 8)
        torch.testing.assert_close(resized[:, 0], position[:, 0])
        # A constant grid stays constant under bicubic resampling.
        constant = torch.cat([position[:, :1], torch.full((1, 16, 8), 0.25)], dim=1)
        torch.testing.assert_close(
            interpolate_position_embeddings(constant, (4, 4), (7, 3))[:, 1:], torch.full((1, 21, 8), 0.25)
        )


# ----------------------------------------------------------------------------- attention paths


class TestAttention:
    @pytest.mark.parametrize("variant", ["all", "last"])
    @pytest.mark.parametrize("training", [False, True])
    def test_fused_equals_eager(self, variant, training):
        model = tiny_model(scm_attention_layers=variant).train(training)
        torch.manual_seed(1)
        pixels = torch.randn(3, 3, 40, 32)
        fused, fused_base = model(pixels), model.deit(pixels)
        model.set_fused_attention(False)
        eager, eager_base = model(pixels), model.deit(pixels)
        torch.testing.assert_close(fused_base.cls_attention, eager_base.cls_attention, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fused_base.last_hidden_state, eager_base.last_hidden_state, atol=1e-5, rtol=1e-5)
        for name in ("logits", "coupled_maps", "semantic_maps"):
            torch.testing.assert_close(getattr(fused, name), getattr(eager, name), atol=1e-5, rtol=1e-5, msg=name)
        # F0 is min-max normalized: a random tiny model's nearly flat attention turns 1e-7 rounding
        # differences of the two kernels into a few 1e-5, and four SCM blocks amplify them to ~1e-4.
        for name in ("attention_maps", "calibrated_attention_maps"):
            if getattr(fused, name) is not None:
                torch.testing.assert_close(getattr(fused, name), getattr(eager, name), atol=1.5e-4, rtol=1e-5, msg=name)

    def test_all_and_last_select_different_layers(self):
        pixels = torch.randn(2, 3, 32, 32)
        all_layers = tiny_model(scm_attention_layers="all").eval()(pixels).attention_maps
        last_layer = tiny_model(scm_attention_layers="last").eval()(pixels).attention_maps
        assert (all_layers - last_layer).abs().max() > 1e-3
        # With a single layer, "all" and "last" are the same layer.
        one_all = tiny_model(num_hidden_layers=1, scm_attention_layers="all").eval()(pixels).attention_maps
        one_last = tiny_model(num_hidden_layers=1, scm_attention_layers="last").eval()(pixels).attention_maps
        torch.testing.assert_close(one_all, one_last)

    def test_cls_attention_matches_explicit_softmax(self):
        """The CLS row equals softmax(q_cls K^T / sqrt(d)) of the last layer, computed from its weights."""
        model = tiny_model(scm_attention_layers="last").eval()
        pixels = torch.randn(2, 3, 32, 32)
        captured = {}
        last = model.deit.encoder.layer[-1]
        handle = last.layernorm_before.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
        out = model.deit(pixels)
        handle.remove()
        x = captured["x"]
        heads, dim = 4, 8
        q, k, _ = last.attention.qkv(x).reshape(2, 17, 3, heads, dim).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-2, -1) / dim**0.5, dim=-1)
        expected = probs[:, :, 0, 1:].mean(dim=1).reshape(2, 4, 4)
        torch.testing.assert_close(out.cls_attention, expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- SCM


def grid_laplacian(height: int, width: int, connectivity: int) -> torch.Tensor:
    """Dense D - A of the grid graph, written from the definition."""
    size = height * width
    adjacency = torch.zeros(size, size, dtype=torch.float64)
    for (y1, x1), (y2, x2) in itertools.product(itertools.product(range(height), range(width)), repeat=2):
        dy, dx = abs(y1 - y2), abs(x1 - x2)
        neighbour = dy + dx == 1 if connectivity == 4 else max(dy, dx) == 1
        if neighbour:
            adjacency[y1 * width + x1, y2 * width + x2] = 1
    return torch.diag(adjacency.sum(dim=0)) - adjacency


def reference_scm(semantic, attention, lambdas, betas, iterations, connectivity=4, alpha=0.002, detach_start=True):
    """The straightforward dense SCM (official code's order of operations), for comparison.

    `detach_start=True` builds X0 without gradient, as the official code does."""
    batch, classes, height, width = semantic.shape
    lap = grid_laplacian(height, width, connectivity).to(semantic.dtype)
    eye = torch.eye(height * width, dtype=semantic.dtype)
    for lam, beta, steps in zip(lambdas, betas, iterations):
        tokens = semantic.flatten(2).transpose(1, 2)
        norms = tokens.norm(dim=-1)
        similarity = (tokens @ tokens.transpose(1, 2)) / (norms[:, :, None] * norms[:, None, :])
        laplacian = lap * (lam * similarity - 1)
        inverse = alpha * laplacian.transpose(1, 2)
        if detach_start:
            inverse = inverse.detach()
        for _ in range(steps):
            inverse = inverse @ (2 * eye - laplacian @ inverse)
        diffused = torch.einsum("bhw,bw->bh", inverse.transpose(1, 2), attention)
        diffused = F.tanhshrink(diffused / (beta * attention.max(dim=1, keepdim=True).values))
        diffused = diffused - diffused.min(dim=1, keepdim=True).values
        diffused = diffused / diffused.max(dim=1, keepdim=True).values
        semantic = semantic + semantic * diffused.view(batch, 1, height, width)
        attention = attention + diffused
    return semantic, attention


def test_minmax_gradient_equals_autograds():
    """The hand-written min-max backward (used in training) equals autograd's through amin/amax in
    float64, clamped rows (constant maps) included."""
    torch.manual_seed(0)
    maps = torch.rand(4, 3, 5, dtype=torch.float64)
    maps[3] = 0.25  # constant: the span is clamped and the map becomes 0
    maps.requires_grad_(True)
    weights = torch.randn(4, 3, 5, dtype=torch.float64)
    ours = minmax_normalize(maps, short_backward=True)
    flat = maps.flatten(1)
    low, high = flat.amin(dim=-1, keepdim=True), flat.amax(dim=-1, keepdim=True)
    expected = ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), maps)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), maps)
    torch.testing.assert_close(grad_ours[:3], grad_expected[:3], atol=1e-12, rtol=1e-10)
    # A constant map: D = (a - min) / eps. Autograd spreads the min's gradient over the tied entries, ours
    # gives it to one; both are g / eps elsewhere and sum to zero (the map does not move as a whole).
    for grad in (grad_ours[3], grad_expected[3]):
        assert grad.abs().max() > 1e10 and grad.sum().abs() < 1e-12 * grad.abs().max() * grad.numel()
    differs = (grad_ours[3] - grad_expected[3]).abs() > 1e-3 * grad_ours[3].abs().max()
    assert differs.sum() == grad_ours[3].numel()  # every entry shares the min's gradient in autograd's
    untouched = grad_ours[3].flatten() == (weights[3] / 1e-12).flatten()
    assert untouched.sum() == grad_ours[3].numel() - 1  # ours: all but the one chosen entry


def test_dense_path_builds_the_laplacian_per_grid():
    """The dense path caches the grid's Laplacian: a second grid size gets its own, not the first one's."""
    config = tiny_config(scm_solver="dense", **_variant_fields("cxr"))
    torch.manual_seed(2)
    cached = DeiTSCMSpatialCalibration(config).double()
    for height, width in ((5, 4), (3, 6), (5, 4)):
        semantic = torch.randn(2, 3, height, width, dtype=torch.float64)
        attention = torch.rand(2, height * width, dtype=torch.float64)
        fresh = DeiTSCMSpatialCalibration(config).double()
        fresh.load_state_dict(cached.state_dict())
        for got, want in zip(cached(semantic, attention), fresh(semantic, attention)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(cached._laplacians) == 2


class TestSCM:
    @pytest.mark.parametrize("solver", ["newton_schulz", "dense", "polynomial", "polynomial_full_gradient"])
    @pytest.mark.parametrize("connectivity", [4, 8])
    @pytest.mark.parametrize("variant", ["paper", "cxr"])
    def test_matches_dense_reference_values_and_gradients(self, solver, connectivity, variant):
        """Every solver gives the dense iteration's values; newton_schulz and polynomial also its
        gradient (X0 detached, as the official code), polynomial_full_gradient the gradient of the whole
        expression."""
        config = tiny_config(scm_connectivity=connectivity, scm_solver=solver, **_variant_fields(variant))
        torch.manual_seed(1)
        model = DeiTSCMForImageClassification(config)
        with torch.no_grad():
            for i, block in enumerate(model.scm.blocks):
                block.lam.add_(0.1 * i)
                block.beta.add_(0.05 * i)
        semantic = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
        attention = torch.rand(2, 20, dtype=torch.float64)
        attention = (attention - attention.min(1, keepdim=True).values) / (
            attention.max(1, keepdim=True).values - attention.min(1, keepdim=True).values
        )
        attention.requires_grad_(True)
        scm = model.scm.double()
        ours = scm(semantic, attention)
        lambdas = [b.lam for b in scm.blocks]
        betas = [b.beta for b in scm.blocks]
        steps = [b.iterations for b in scm.blocks]
        assert steps == ([16, 4, 4, 4] if variant == "paper" else [4, 4, 4, 4])
        ref = reference_scm(
            semantic, attention, lambdas, betas, steps, connectivity, detach_start=solver != "polynomial_full_gradient"
        )
        for got, want in zip(ours, ref):
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)
        loss_ours = (ours[0] ** 2).sum() + ours[1].sum()
        loss_ref = (ref[0] ** 2).sum() + ref[1].sum()
        inputs = [semantic, attention, *lambdas, *betas]
        grads_ours = torch.autograd.grad(loss_ours, inputs)
        grads_ref = torch.autograd.grad(loss_ref, inputs)
        for got, want in zip(grads_ours, grads_ref):
            torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-6)

    @pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
    def test_paper_gradients_equal_official_newton_schulz_float64(self, lam):
        """The `paper` preset (default polynomial solver) trains as the official code: in float64 its
        loss and every gradient (backbone, head, lambda, beta) equal the dense Newton-Schulz iteration
        with the detached start, to 1e-9 relative (1e-13 absolute for near-zero gradients)."""
        fields = {**_variant_fields("paper"), "scm_lambda_init": lam}
        assert DeiTSCMConfig.from_preset("deit-small", "paper").scm_solver == "auto"
        results = {}
        for solver in ("newton_schulz", "auto", "dense"):
            model = tiny_model(seed=3, image_size=48, scm_solver=solver, **fields).double().train()
            with torch.no_grad():
                for i, block in enumerate(model.scm.blocks):
                    block.beta.add_(0.1 * i)
            torch.manual_seed(5)
            pixels = torch.randn(2, 3, 48, 48, dtype=torch.float64)
            out = model(pixels, labels=torch.tensor([0, 2]))
            out.loss.backward()
            results[solver] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        loss_ns, grads_ns = results["newton_schulz"]
        for solver in ("auto", "dense"):  # on the CPU "auto" is the polynomial; "dense" is the GPU path
            loss_other, grads_other = results[solver]
            torch.testing.assert_close(loss_other, loss_ns, rtol=1e-12, atol=0)
            assert grads_ns.keys() == grads_other.keys()
            for name, want in grads_ns.items():
                got = grads_other[name]
                relative = (got - want).norm() / want.norm().clamp_min(1e-300)
                # A floor at float64 rounding for gradients that are themselves ~1e-8 (late blocks' beta).
                assert (got - want).norm() <= 1e-9 * want.norm() + 1e-13, (solver, name, float(relative))
        assert all(grads_ns[f"scm.blocks.{i}.lam"].abs() > 0 for i in range(4))

    def test_full_gradient_solver_differs_in_gradient_only(self):
        fields = _variant_fields("paper")
        torch.manual_seed(0)
        semantic = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
        attention = torch.rand(2, 36, dtype=torch.float64)
        outputs, grads = {}, {}
        for solver in ("polynomial", "polynomial_full_gradient"):
            model = tiny_model(seed=1, scm_solver=solver, **fields).double()
            result = model.scm(semantic, attention)
            outputs[solver] = result[0].detach()
            grads[solver] = torch.autograd.grad(result[0].square().sum(), semantic)[0]
        torch.testing.assert_close(outputs["polynomial"], outputs["polynomial_full_gradient"], rtol=1e-10, atol=1e-12)
        assert (grads["polynomial"] - grads["polynomial_full_gradient"]).abs().max() > 1e-6

    @pytest.mark.parametrize("variant", ["paper", "cxr"])
    def test_polynomial_solver_matches_newton_schulz_in_fp32(self, variant):
        """At DeiT's 14x14 grid, on class maps of a trained-like scale, fp32, within 1e-4 relative."""
        torch.manual_seed(0)
        fields = _variant_fields(variant)
        semantic = torch.randn(4, 3, 14, 14) * 2 + torch.linspace(-1, 1, 14).view(1, 1, 14, 1)
        attention = torch.rand(4, 196)
        attention = (attention - attention.amin(1, keepdim=True)) / (
            attention.amax(1, keepdim=True) - attention.amin(1, keepdim=True)
        )
        results = {}
        for solver in ("newton_schulz", "polynomial"):
            model = DeiTSCMForImageClassification(tiny_config(scm_solver=solver, **fields))
            with torch.no_grad():
                results[solver] = model.scm(semantic, attention)
        for got, want in zip(results["polynomial"], results["newton_schulz"]):
            assert ((got - want).norm() / want.norm()).item() < 1e-4

    def test_auto_solver_is_chosen_by_device(self):
        assert resolve_solver("auto", torch.device("cpu")) == "polynomial"
        assert resolve_solver("auto", torch.device("cuda", 0)) == "dense"
        for solver in ("polynomial", "dense", "newton_schulz", "polynomial_full_gradient"):
            assert resolve_solver(solver, torch.device("cuda")) == solver
        assert SCM_SOLVERS[0] == "auto" and set(SCM_SOLVERS) >= {"polynomial", "dense", "newton_schulz"}

    @pytest.mark.parametrize("connectivity", [4, 8])
    def test_grid_laplacian_is_degree_minus_adjacency(self, connectivity):
        lap = model_grid_laplacian(3, 4, connectivity, dtype=torch.float64)
        torch.testing.assert_close(lap, grid_laplacian(3, 4, connectivity).to(torch.float64))
        # Patch (1, 1) = index 5: 4 or 8 neighbours, all inside the 3 x 4 grid.
        assert lap[5, 5] == connectivity
        neighbours = {4, 6, 1, 9} if connectivity == 4 else {0, 1, 2, 4, 6, 8, 9, 10}
        assert set(torch.nonzero(lap[5] == -1).flatten().tolist()) == neighbours
        assert lap[0, 0] == (2 if connectivity == 4 else 3)  # a corner
        torch.testing.assert_close(lap.sum(dim=1), torch.zeros(12, dtype=torch.float64))
        torch.testing.assert_close(lap, lap.T)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
    def test_cxr_model_trains_in_other_dtypes(self, dtype):
        """The class-weight buffer follows the logits: a cxr model cast to float64 or bfloat16 computes
        its loss (it crashed before), and float64 stays float64 end to end."""
        fields = {**_variant_fields("cxr"), "scm_pooling": "lse", "class_weights": [0.7, 0.1, 0.2]}
        model = tiny_model(seed=0, **fields).to(dtype).train()
        out = model(torch.randn(2, 3, 32, 32, dtype=dtype), labels=torch.tensor([0, 2]))
        assert torch.isfinite(out.loss)
        assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        out.loss.backward()

    def test_grid_operator_dense_matches_definition(self):
        semantic = torch.randn(1, 3, 3, 4, dtype=torch.float64)
        lam = torch.tensor([1.7], dtype=torch.float64)
        operator = GridOperator(semantic, lam, 4)
        tokens = F.normalize(semantic.flatten(2).transpose(1, 2), dim=-1)
        expected = grid_laplacian(3, 4, 4) * (lam * tokens @ tokens.transpose(1, 2) - 1)
        torch.testing.assert_close(operator.dense(), expected)
        other = torch.randn(1, 12, 5, dtype=torch.float64)
        torch.testing.assert_close(operator.matmul(other), expected @ other)

    def test_constant_attention_does_not_produce_nan(self):
        model = tiny_model().train()
        out = model.scm(torch.randn(2, 3, 4, 4), torch.zeros(2, 16))
        assert all(torch.isfinite(t).all() for t in out)


def _variant_fields(variant: str) -> dict:
    preset = DeiTSCMConfig.from_preset("deit-tiny", variant)
    keys = (
        "scm_attention_layers",
        "scm_lambda_init",
        "scm_beta_init",
        "scm_num_blocks",
        "scm_first_block_iterations",
        "scm_iterations",
    )
    return {k: getattr(preset, k) for k in keys}


# ----------------------------------------------------------------------------- train / eval paths


class TestTrainEval:
    def test_eval_logits_are_mean_of_semantic_maps_and_maps_are_products(self):
        model = tiny_model().eval()
        out = model(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(out.logits, out.semantic_maps.mean(dim=(2, 3)))
        torch.testing.assert_close(out.coupled_maps, out.attention_maps[:, None] * out.semantic_maps)
        flat = out.attention_maps.flatten(1)
        torch.testing.assert_close(flat.min(1).values, torch.zeros(2))
        torch.testing.assert_close(flat.max(1).values, torch.ones(2))

    def test_train_logits_come_from_calibrated_semantic_maps(self):
        model = tiny_model().train()
        pixels = torch.randn(2, 3, 32, 32)
        out = model(pixels)
        semantic, attention = model.scm(out.semantic_maps, out.attention_maps.flatten(1))
        torch.testing.assert_close(out.logits, semantic.mean(dim=(2, 3)))
        torch.testing.assert_close(out.calibrated_attention_maps, attention.view(2, 4, 4))
        assert (out.logits - out.semantic_maps.mean(dim=(2, 3))).abs().max() > 1e-4
        # The blocks can be run at inference too, and skipped in training.
        model.eval()
        torch.testing.assert_close(model(pixels, run_scm=True).logits, out.logits)
        model.train()
        torch.testing.assert_close(model(pixels, run_scm=False).logits, out.semantic_maps.mean(dim=(2, 3)))

    def test_every_trainable_parameter_gets_gradient_in_train_mode(self):
        model = tiny_model().train()
        out = model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 1]))
        out.loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert missing == []
        assert len(model.scm.blocks) == 4 and all(
            b.lam.grad is not None and b.beta.grad is not None for b in model.scm.blocks
        )

    def test_scm_parameters_get_no_gradient_in_eval_path(self):
        model = tiny_model().eval()
        model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss.backward()
        assert all(b.lam.grad is None for b in model.scm.blocks)

    def test_loss_equals_hand_computation(self):
        weights, smoothing = [0.7045, 0.1181, 0.1774], 0.1
        model = tiny_model(class_weights=weights, label_smoothing=smoothing).eval()
        labels = torch.tensor([0, 2, 1, 0])
        out = model(torch.randn(4, 3, 32, 32), labels=labels)
        log_p = out.logits.log_softmax(dim=-1)
        w = torch.tensor(weights)
        classes = 3
        # PyTorch's weighted, smoothed CE: per sample (1-e) w_y (-log p_y) + e/C sum_c w_c (-log p_c),
        # averaged with the target weights w_y as denominator.
        per_sample = (1 - smoothing) * w[labels] * -log_p[torch.arange(4), labels] + smoothing / classes * (
            w * -log_p
        ).sum(dim=1)
        expected = per_sample.sum() / w[labels].sum()
        torch.testing.assert_close(out.loss, expected)

    def test_unweighted_loss_is_plain_cross_entropy(self):
        model = tiny_model().eval()
        labels = torch.tensor([2, 0])
        out = model(torch.randn(2, 3, 32, 32), labels=labels)
        expected = -out.logits.log_softmax(-1)[torch.arange(2), labels].mean()
        torch.testing.assert_close(out.loss, expected)

    def test_select_class_maps(self):
        maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
        torch.testing.assert_close(
            select_class_maps(maps, labels=torch.tensor([2, 0])), torch.stack([maps[0, 2], maps[1, 0]])
        )
        logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
        torch.testing.assert_close(select_class_maps(maps, logits=logits), torch.stack([maps[0, 1], maps[1, 0]]))
        with pytest.raises(ValueError):
            select_class_maps(maps)
        # F0 has no class axis: every class's map is the same one.
        attention = maps[:, 0]
        assert select_class_maps(attention, labels=torch.tensor([2, 0])) is attention

    def test_parameter_groups_cover_each_parameter_once(self):
        model = tiny_model()
        groups = model.parameter_groups(learning_rate=1e-5, scm_learning_rate=1e-3, weight_decay=0.05)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        by_name = {g["name"]: g for g in groups}
        assert by_name["backbone"]["lr"] == 1e-5 and by_name["scm_head"]["lr"] == 1e-3
        no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        for name, parameter in model.named_parameters():
            expect_no_decay = (
                name.endswith("bias")
                or "layernorm" in name
                or name.endswith(("cls_token", "position_embeddings", ".lam", ".beta"))
            )
            assert (id(parameter) in no_decay) == expect_no_decay, name

    def test_init_is_deterministic_and_sets_scm_scalars(self):
        a, b = tiny_model(seed=3), tiny_model(seed=3)
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(pa, pb, msg=name)
        model = tiny_model(scm_lambda_init=2.0, scm_beta_init=0.1)
        assert all(blk.lam.item() == 2.0 and abs(blk.beta.item() - 0.1) < 1e-7 for blk in model.scm.blocks)
        std = a.deit.encoder.layer[0].mlp.fc1.weight.std().item()
        assert 0.01 < std < 0.03

    def test_head_keeps_pytorchs_default_conv_init(self):
        """The official 3x3 head conv is left at nn.Conv2d's default: U(+-1/sqrt(fan_in)) for weight and
        bias, weight std 1/sqrt(3 fan_in) = 0.00982 at 384 -> C (fan_in = 384 * 9 = 3456)."""
        torch.manual_seed(0)
        model = DeiTSCMForImageClassification(DeiTSCMConfig.from_preset("deit-small", "paper"))
        weight, bias = model.head.weight.detach(), model.head.bias.detach()
        bound = 1 / 3456**0.5
        assert weight.abs().max() <= bound and bias.abs().max() <= bound
        assert abs(weight.std().item() - 0.00982) < 0.0003
        assert (bias != 0).all()


class TestHeadKernel:
    @staticmethod
    def maps_after_changing_one_token(kernel: int) -> torch.Tensor:
        """|S0 change| (h, w) when only the final token of grid cell (1, 2) changes (model in eval)."""
        model = tiny_model(head_kernel_size=kernel).eval()
        hidden = torch.randn(1, 32, 4, 4)
        changed = hidden.clone()
        changed[0, :, 1, 2] += 5.0
        with torch.no_grad():
            return (model.head(changed) - model.head(hidden)).abs().amax(dim=1)[0]

    def test_a_1x1_head_scores_each_token_alone(self):
        delta = self.maps_after_changing_one_token(1)
        assert delta[1, 2] > 0
        delta[1, 2] = 0
        assert delta.max() == 0

    def test_the_3x3_head_spreads_a_token_to_its_eight_neighbours(self):
        delta = self.maps_after_changing_one_token(3)
        moved = (delta > 0).nonzero().tolist()
        assert sorted(moved) == [[r, c] for r in (0, 1, 2) for c in (1, 2, 3)]

    def test_defaults_presets_and_old_configs(self):
        assert DeiTSCMConfig().head_kernel_size == 3  # TS-CAM's and the SCM code's head
        assert DeiTSCMConfig.from_preset("deit-small", "paper").head_kernel_size == 3
        assert DeiTSCMConfig.from_preset("deit-micro", "cxr").head_kernel_size == 3
        saved = DeiTSCMConfig().to_dict()
        del saved["head_kernel_size"]  # a config.json written before the field existed
        model = DeiTSCMForImageClassification(DeiTSCMConfig.from_dict(saved))
        assert model.head.kernel_size == (3, 3)

    def test_maps_keep_the_grid_and_the_loss_trains_the_head(self):
        model = tiny_model(head_kernel_size=1, scm_pooling="lse").train()
        out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
        assert out.semantic_maps.shape == (2, 3, 4, 4)
        out.loss.backward()
        assert model.head.weight.grad.abs().sum() > 0

    @pytest.mark.parametrize("kernel", [0, 2, -1, 1.0, True])
    def test_bad_kernel_sizes_are_refused(self, kernel):
        with pytest.raises(ValueError, match="head_kernel_size"):
            tiny_config(head_kernel_size=kernel)


class TestPoolingAndStem:
    def test_mean_pooling_is_the_global_average(self):
        model = tiny_model().eval()
        out = model(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(out.logits, out.semantic_maps.mean(dim=(2, 3)))

    def test_lse_pooling_by_hand(self):
        """LSE_r(S) = (1/r) log(mean exp(r S)); on [0, 0, 0, a] with r = 1 that is log((3 + e^a) / 4)."""
        model = tiny_model(image_size=16, scm_pooling="lse", scm_lse_r=1.0)
        maps = torch.zeros(1, 3, 2, 2)
        maps[0, 0, 1, 1] = 2.0
        maps[0, 1] = 0.7
        pooled = model.pooling(maps)
        assert pooled[0, 0].item() == pytest.approx(float(torch.log(torch.tensor((3 + 2.718281828**2) / 4))))
        assert pooled[0, 1].item() == pytest.approx(0.7)  # a constant map pools to itself
        sharp = tiny_model(image_size=16, scm_pooling="lse", scm_lse_r=200.0).pooling(maps)
        assert sharp[0, 0].item() == pytest.approx(2.0 - float(torch.log(torch.tensor(4.0))) / 200, abs=1e-4)

    @pytest.mark.parametrize("training", [True, False])
    def test_lse_is_used_in_both_paths(self, training):
        model = tiny_model(scm_pooling="lse", scm_lse_r=5.0).train(training)
        out = model(torch.randn(2, 3, 32, 32))
        maps = out.semantic_maps if not training else None
        if maps is not None:
            expected = (torch.logsumexp(5 * maps.flatten(2), -1) - torch.log(torch.tensor(16.0))) / 5
            torch.testing.assert_close(out.logits, expected)
        assert out.logits.shape == (2, 3)

    def test_learnable_r_gets_gradient_and_round_trips(self, tmp_path):
        model = tiny_model(scm_pooling="lse", scm_lse_r=3.0, scm_lse_learnable=True).train()
        assert model.pooling.r.item() == pytest.approx(3.0)
        model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss.backward()
        assert model.pooling.log_r.grad is not None and model.pooling.log_r.grad.abs() > 0
        with torch.no_grad():
            model.pooling.log_r.fill_(0.5)
        model.save_pretrained(tmp_path)
        reloaded = DeiTSCMForImageClassification.from_pretrained(tmp_path)
        assert reloaded.pooling.log_r.item() == pytest.approx(0.5)

    def test_conv_stem_gives_the_patch_grid(self):
        model = tiny_model(patch_embedding="conv_stem", image_size=64).eval()
        stem = model.deit.embeddings.patch_embeddings
        strides = [m.stride for m in stem.stem if isinstance(m, torch.nn.Conv2d)]
        assert strides == [(2, 2), (2, 2), (2, 2), (1, 1)]  # log2(8) stride-2 3x3 convs, then 1x1
        out = model(torch.randn(2, 1, 64, 64))
        assert out.semantic_maps.shape == (2, 3, 8, 8)
        with pytest.raises(ValueError, match="patch_embedding"):
            tiny_config(patch_embedding="conv_stem", patch_size=6, image_size=36)
        with pytest.raises(ValueError, match="scm_pooling"):
            tiny_config(scm_pooling="max")


class TestConvStemCentring:
    @staticmethod
    def receptive_field_centre(kernel: int, patch: int, row: int, column: int) -> tuple[float, float]:
        """Centre (y, x) in pixel indices of the input pixels that token (row, column) of the stem sees."""
        torch.manual_seed(0)
        model = tiny_model(patch_embedding="conv_stem", patch_size=patch, image_size=64, conv_stem_kernel_size=kernel)
        model.eval()  # BatchNorm in training mode would couple every pixel of the image
        pixels = torch.randn(1, 3, 64, 64, requires_grad=True)
        tokens, grid = model.deit.embeddings.patch_embeddings(pixels)
        tokens[0, row * grid[1] + column].sum().backward()
        seen = pixels.grad.abs().sum(dim=(0, 1)).nonzero()
        return tuple(float(seen[:, axis].min() + seen[:, axis].max()) / 2 for axis in (0, 1))

    @pytest.mark.parametrize("patch", [4, 8])
    def test_the_4_wide_stem_centres_each_token_on_its_patch(self, patch):
        for row, column in [(1, 1), (2, 5), (5, 2)]:  # tokens whose field the image border does not clip
            centre = self.receptive_field_centre(4, patch, row, column)
            # Pixel-index coordinates: the patch covers [patch * i, patch * (i + 1) - 1].
            assert centre == (patch * row + (patch - 1) / 2, patch * column + (patch - 1) / 2)

    def test_xiao_et_als_3_wide_stem_sits_up_and_left_of_its_patch(self):
        """Why the field exists: with 3x3 kernels token (2, 5) of patch 8 looks at (16, 40), not (19.5, 43.5)."""
        assert self.receptive_field_centre(3, 8, 2, 5) == (16.0, 40.0)

    def test_kernels_grid_defaults_and_refusals(self):
        assert DeiTSCMConfig().conv_stem_kernel_size == 3
        for kernel in (3, 4):
            model = tiny_model(patch_embedding="conv_stem", image_size=64, conv_stem_kernel_size=kernel).eval()
            convs = [m for m in model.deit.embeddings.patch_embeddings.stem if isinstance(m, torch.nn.Conv2d)]
            sides = [m.kernel_size for m in convs]
            assert sides == [(kernel, kernel)] * 3 + [(1, 1)]
            assert model(torch.randn(1, 3, 64, 64)).semantic_maps.shape == (1, 3, 8, 8)
        uneven = tiny_model(patch_embedding="conv_stem", patch_size=(8, 4), image_size=64, conv_stem_kernel_size=4)
        assert uneven(torch.randn(1, 3, 64, 64)).semantic_maps.shape == (1, 3, 8, 16)
        for bad in (2, 5, "4"):
            with pytest.raises(ValueError, match="conv_stem_kernel_size"):
                tiny_config(conv_stem_kernel_size=bad)


# ----------------------------------------------------------------------------- save / load / remote code


def test_cls_loss_adds_a_weighted_cross_entropy_on_the_cls_token():
    torch.manual_seed(0)
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    plain = DeiTSCMForImageClassification(DeiTSCMConfig.from_preset("deit-micro", "cxr", image_size=32)).eval()
    assert plain.cls_classifier is None and plain(pixels, labels=labels).cls_logits is None
    config = DeiTSCMConfig.from_preset("deit-micro", "cxr", image_size=32, cls_loss_weight=0.5)
    model = DeiTSCMForImageClassification(config).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    outputs = model(pixels, labels=labels)
    cls_logits = model.cls_classifier(model.deit.forward_features(pixels)[0][:, 0])
    weights = torch.tensor(config.class_weights)
    smoothing = config.label_smoothing
    expected = F.cross_entropy(outputs.logits, labels, weight=weights, label_smoothing=smoothing)
    expected = expected + 0.5 * F.cross_entropy(cls_logits, labels, weight=weights, label_smoothing=smoothing)
    torch.testing.assert_close(outputs.loss, expected)
    # Logits and maps are the model's without the CLS head: the auxiliary loss only trains.
    reference = plain(pixels)
    torch.testing.assert_close(outputs.logits, reference.logits)
    torch.testing.assert_close(outputs.coupled_maps, reference.coupled_maps)
    # The CLS query of the last layer gets a gradient from the CLS loss alone.
    model.train()
    model.zero_grad()
    cls_only = model(pixels, labels=labels)
    F.cross_entropy(cls_only.cls_logits, labels).backward()
    assert model.cls_classifier.weight.grad.abs().sum() > 0
    assert model.deit.encoder.layer[-1].attention.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cls_loss_weight"):
        DeiTSCMConfig(cls_loss_weight=-1.0)


def test_semantic_loss_adds_the_pooled_s0_cross_entropy_while_scm_runs():
    torch.manual_seed(0)
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    plain = DeiTSCMForImageClassification(DeiTSCMConfig.from_preset("deit-micro", "cxr", image_size=32)).eval()
    config = DeiTSCMConfig.from_preset("deit-micro", "cxr", image_size=32, semantic_loss_weight=0.5)
    model = DeiTSCMForImageClassification(config).eval()
    model.load_state_dict(plain.state_dict())
    weights, smoothing = torch.tensor(config.class_weights), config.label_smoothing
    with_scm = model(pixels, labels=labels, run_scm=True)
    s0_logits = plain(pixels).logits  # inference: the pooled S0, no blocks
    expected = F.cross_entropy(with_scm.logits, labels, weight=weights, label_smoothing=smoothing)
    expected = expected + 0.5 * F.cross_entropy(s0_logits, labels, weight=weights, label_smoothing=smoothing)
    torch.testing.assert_close(with_scm.loss, expected)
    # SCM's logits are unchanged: the extra term only trains.
    torch.testing.assert_close(with_scm.logits, plain(pixels, run_scm=True).logits)
    # Without the blocks (the warm-up, inference) the loss is the plain one: S0's logits are the logits then.
    without = model(pixels, labels=labels, run_scm=False)
    plain_loss = F.cross_entropy(s0_logits, labels, weight=weights, label_smoothing=smoothing)
    torch.testing.assert_close(without.loss, plain_loss)
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="semantic_loss_weight"):
            DeiTSCMConfig(semantic_loss_weight=bad)


def test_scm_detach_attention_stops_the_scm_gradient_into_f0_only():
    """With `scm_detach_attention`, the loss through SCM no longer reaches the last layer's CLS query (whose only
    other use, the CLS token's output, no loss reads here); the forward pass is unchanged."""
    torch.manual_seed(0)
    pixels, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])

    def cls_query_gradient(detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = tiny_model(scm_detach_attention=detach)
        model.train()
        captured = {}
        layer = model.deit.encoder.layer[-1].attention.qkv
        handle = layer.register_forward_hook(lambda _m, _i, output: captured.setdefault("qkv", output))
        outputs = model(pixels, labels=labels)
        captured["qkv"].retain_grad()
        outputs.loss.backward()
        handle.remove()
        width = model.config.hidden_size
        return captured["qkv"].grad[:, 0, :width], outputs.logits.detach()

    attached, logits = cls_query_gradient(False)
    detached, same_logits = cls_query_gradient(True)
    assert attached.abs().sum() > 0
    assert torch.equal(detached, torch.zeros_like(detached))
    torch.testing.assert_close(logits, same_logits, rtol=0, atol=0)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="scm_detach_attention"):
            tiny_config(scm_detach_attention=bad)


def test_token_distances_are_grid_distances_with_the_cls_token_at_zero():
    distances = token_distances((2, 3))
    assert distances.shape == (7, 7)
    assert torch.equal(distances[0], torch.zeros(7)) and torch.equal(distances[:, 0], torch.zeros(7))
    # patch (0, 0) is token 1, (0, 2) is token 3, (1, 2) is token 6
    assert distances[1, 3].item() == 2.0 and distances[1, 6].item() == pytest.approx(5**0.5)
    assert torch.equal(distances, distances.T)


def test_attention_locality_makes_near_patches_weigh_more_and_stays_learnable():
    torch.manual_seed(0)
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    plain = tiny_model()
    assert all(layer.attention.locality_slope is None for layer in plain.deit.encoder.layer)
    local = DeiTSCMForImageClassification(tiny_config(attention_locality=1.0))
    local.load_state_dict(plain.state_dict(), strict=False)
    attention = local.deit.encoder.layer[0].attention
    # slopes start at 1, 1/4, 1/16, 1/64 (one per head), positive through softplus
    torch.testing.assert_close(F.softplus(attention.locality_slope), torch.tensor([1.0, 0.25, 0.0625, 0.015625]))
    # With identical keys every logit is equal, so the weights are the bias alone: exp(-m d), normalized.
    attention.qkv.weight.data.zero_()
    attention.qkv.bias.data.zero_()
    hidden = torch.randn(1, 17, 32)
    distances = token_distances((4, 4))
    bias = attention.locality_bias(distances)
    weights = bias.softmax(dim=-1)
    centre = 1 + 5  # patch (1, 1)
    assert weights[0, centre, centre] > weights[0, centre, 1 + 6] > weights[0, centre, 1 + 15]
    # the fused and explicit paths agree with the bias
    fused, _ = attention(hidden, distances=distances)
    attention.fused_attn = False
    explicit, _ = attention(hidden, distances=distances)
    torch.testing.assert_close(fused, explicit)
    # 0 = off: the same model as one built without the field
    off = DeiTSCMForImageClassification(tiny_config(attention_locality=0.0)).eval()
    off.load_state_dict(plain.state_dict())
    torch.testing.assert_close(off(pixels).logits, plain.eval()(pixels).logits, rtol=0, atol=0)
    # and on: different logits, a gradient for every layer's slopes
    fresh = DeiTSCMForImageClassification(tiny_config(attention_locality=1.0))
    fresh.load_state_dict(plain.state_dict(), strict=False)
    assert not torch.allclose(fresh.eval()(pixels).logits, plain(pixels).logits)
    fresh.train()
    fresh(pixels, labels=labels).loss.backward()
    for layer in fresh.deit.encoder.layer:
        assert layer.attention.locality_slope.grad.abs().sum() > 0
    # the slopes take no weight decay
    no_decay = [g for g in local.parameter_groups() if g["weight_decay"] == 0.0]
    assert any(p is attention.locality_slope for g in no_decay for p in g["params"])
    for bad in (-1.0, float("nan"), "near"):
        with pytest.raises(ValueError, match="attention_locality"):
            tiny_config(attention_locality=bad)


def test_save_pretrained_writes_safetensors_and_auto_map(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"configuration_deit_scm.py", "modeling_deit_scm.py", "scm_diffusion.py"} <= set(files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_deit_scm.DeiTSCMConfig",
        "AutoModel": "modeling_deit_scm.DeiTSCMModel",
        "AutoModelForImageClassification": "modeling_deit_scm.DeiTSCMForImageClassification",
    }
    reloaded = DeiTSCMForImageClassification.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded(pixels).logits, model.eval()(pixels).logits, atol=0, rtol=0)


def test_remote_code_in_fresh_interpreter_outside_the_project(tmp_path):
    model = tiny_model(scm_attention_layers="last", class_weights=[1.0, 2.0, 3.0]).eval()
    pixels = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        expected = model(pixels)
    checkpoint, elsewhere = tmp_path / "checkpoint", tmp_path / "elsewhere"
    elsewhere.mkdir()
    model.save_pretrained(checkpoint)
    torch.save({"pixels": pixels, "logits": expected.logits, "maps": expected.coupled_maps}, tmp_path / "io.pt")
    script = f"""
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
io = torch.load({str(tmp_path / "io.pt")!r})
model = AutoModelForImageClassification.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
assert type(model).__name__ == "DeiTSCMForImageClassification", type(model)
assert "transformers_modules" in type(model).__module__
with torch.no_grad():
    out = model(io["pixels"])
assert torch.equal(out.logits, io["logits"]), (out.logits, io["logits"])
assert torch.equal(out.coupled_maps, io["maps"])
config = AutoConfig.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
assert config.model_type == "deit_scm" and config.class_weights == [1.0, 2.0, 3.0]
base = AutoModel.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
assert type(base).__name__ == "DeiTSCMModel"
print("REMOTE_OK")
"""
    result = run_outside_repo(script, elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK" in result.stdout
