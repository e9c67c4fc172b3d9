"""The strength window equals what diffusers' img2img runs; the forward process and weights match the papers."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image

from adapt import objective
from adapt.tiny import build_tiny_components

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def img2img_pipe():
    c = build_tiny_components(seed=0)
    pipe = StableDiffusionImg2ImgPipeline(**c)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _visited(pipe, scheduler, steps, strength):
    """Timesteps the UNet actually sees during a real img2img call."""
    seen = []
    orig = pipe.unet.forward

    def spy(sample, timestep, *a, **k):
        seen.append(int(timestep.item() if torch.is_tensor(timestep) else timestep))
        return orig(sample, timestep, *a, **k)

    pipe.scheduler = scheduler
    pipe.unet.forward = spy
    try:
        pipe(prompt="a face", image=Image.new("RGB", (64, 64), (120, 80, 40)), strength=strength,
             num_inference_steps=steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        pipe.unet.forward = orig
    return seen


SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "ddpm": lambda: DDPMScheduler(**SD_BETAS),
    "euler": lambda: EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps,strength", [(10, 0.3), (20, 0.5), (25, 0.75), (8, 1.0)])
def test_window_equals_timesteps_img2img_runs(img2img_pipe, name, steps, strength):
    sched = SCHEDULERS[name]()
    window = objective.strength_window(sched, steps, strength).tolist()
    assert window == _visited(img2img_pipe, SCHEDULERS[name](), steps, strength)
    assert len(window) == int(steps * strength)


def test_window_variants_and_bad_strength():
    sched = SCHEDULERS["ddim"]()
    exact = objective.window_timesteps(sched, 50, 0.6, "img2img_exact")
    cont = objective.window_timesteps(sched, 50, 0.6, "continuous")
    full = objective.window_timesteps(sched, 50, 0.6, "full")
    assert len(exact) == 30 and int(exact.max()) == 581 and int(exact.min()) == 1
    assert cont.tolist() == list(range(582))
    assert len(full) == 1000
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="strength"):
            objective.strength_window(sched, 50, bad)
    with pytest.raises(ValueError, match="visits no timestep"):
        objective.strength_window(sched, 10, 0.05)
    before = SCHEDULERS["ddim"]()
    objective.strength_window(before, 50, 0.5)
    assert before.num_inference_steps is None


def test_forward_process_is_variance_preserving():
    ac = DDPMScheduler(**SD_BETAS).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for v in (1.0, 4.0):
        x0 = torch.randn(n, 1, 1, 1, generator=g) * v ** 0.5
        eps = torch.randn(n, 1, 1, 1, generator=g)
        for t in (0, 100, 500, 999):
            xt = objective.q_sample(ac, x0, eps, torch.full((n,), t))
            expected = float(ac[t]) * v + 1 - float(ac[t])
            assert abs(float(xt.var()) - expected) < 0.02 * expected, (v, t)


def test_v_target_identities():
    ac = DDPMScheduler(**SD_BETAS).alphas_cumprod
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    v = objective.v_target(ac, x0, eps, t)
    xt = objective.q_sample(ac, x0, eps, t)
    a = ac[t].view(-1, 1, 1, 1).sqrt()
    s = (1 - ac[t]).view(-1, 1, 1, 1).sqrt()
    torch.testing.assert_close(a * xt - s * v, x0, atol=1e-5, rtol=1e-5)  # x0 = √ᾱ x_t − √(1−ᾱ) v
    torch.testing.assert_close(s * xt + a * v, eps, atol=1e-5, rtol=1e-5)  # ε = √(1−ᾱ) x_t + √ᾱ v
    # diffusers' own v target agrees
    torch.testing.assert_close(v, DDPMScheduler(**SD_BETAS, prediction_type="v_prediction").get_velocity(x0, eps, t))
    assert objective.target("epsilon", ac, x0, eps, t) is eps


def test_min_snr_weights_match_paper():
    ac = DDPMScheduler(**SD_BETAS).alphas_cumprod
    t = torch.tensor([0, 10, 100, 500, 999])
    snr = ac[t] / (1 - ac[t])
    gamma = 5.0
    torch.testing.assert_close(objective.min_snr_weights(ac, t, gamma, "sample"), torch.minimum(snr, torch.tensor(gamma)))
    torch.testing.assert_close(objective.min_snr_weights(ac, t, gamma, "epsilon"), torch.minimum(snr, torch.tensor(gamma)) / snr)
    torch.testing.assert_close(objective.min_snr_weights(ac, t, gamma, "v_prediction"), torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    w = objective.min_snr_weights(ac, t, gamma, "epsilon")
    assert float(w[0]) < 0.01 and float(w[-1]) == pytest.approx(1.0)  # low noise down-weighted, high noise kept


def test_loss_is_per_sample_and_known_value():
    pred = torch.zeros(3, 4, 2, 2)
    tgt = torch.stack([torch.full((4, 2, 2), float(i)) for i in range(3)])
    l = objective.loss(pred, tgt)
    assert l.shape == (3,) and l.tolist() == [0.0, 1.0, 4.0]
    assert objective.loss(pred, tgt, torch.tensor([1.0, 2.0, 0.5])).tolist() == [0.0, 2.0, 2.0]


def test_v_prediction_loss_on_known_triple():
    ac = DDPMScheduler(**SD_BETAS).alphas_cumprod
    x0, eps, t = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([300])
    a, s = float(ac[300]) ** 0.5, float(1 - ac[300]) ** 0.5
    v = a * 2.0 - s * 1.0
    pred = torch.zeros(1, 1, 1, 1)
    assert float(objective.loss(pred, objective.target("v_prediction", ac, x0, eps, t))) == pytest.approx(v * v, rel=1e-6)


def test_offset_noise():
    n = torch.zeros(2, 4, 8, 8)
    assert objective.offset_noise(n, 0.0) is n
    o = objective.offset_noise(n, 0.1, torch.Generator().manual_seed(0))
    assert o.shape == n.shape and torch.all(o[:, :, :1, :1] == o)  # constant per (sample, channel)


def test_compare_windows_reports_first_and_held_crossings():
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "recipes"))
    from compare_windows import crossings
    det = {125: 0.5, 250: 0.91, 375: 0.8, 500: 0.92, 625: 0.95}  # crosses at 250, dips, holds from 500
    assert crossings({s: {"detected": d} for s, d in det.items()}) == (250, 500)
    assert crossings({125: {"detected": 0.5}, 250: {"detected": 0.89}}) == (None, None)


def test_compare_windows_alignment_measures_the_run_it_is_given(tiny_base, sg_folder, tmp_path):
    """--alignment reads the run's config and checkpoint: cosines of one batch's LoRA gradient with the window's
    expected one, and their ratio as the predicted steps ratio. The window's own batches must agree with the mean
    of other window batches more than chance (a random direction in this many dimensions has |cos| ~ 0.01)."""
    import sys
    from conftest import ROOT, recipe_args, run_recipe
    sys.path.insert(0, str(ROOT / "recipes"))
    from compare_windows import alignment
    run = tmp_path / "img2img_exact"
    r = run_recipe(recipe_args(tiny_base, sg_folder, run, "train.checkpointing_steps=2", "validation.source=null"),
                   launcher="python")
    assert r.returncode == 0, r.stderr[-2000:]
    a = alignment(run, 2, batches=3)
    assert set(a) == {f"cos_{k}_{w}" for k in ("batch", "mean") for w in ("window", "full", "above")} | {"predicted_steps_ratio"}
    assert all(-1.0 <= a[k] <= 1.0 for k in a if k.startswith("cos_"))
    assert a["cos_batch_window"] > 0.1 and a["predicted_steps_ratio"] == pytest.approx(a["cos_batch_full"] / a["cos_batch_window"])


def test_compare_windows_gates_the_adapter_by_timestep(tiny_base, tmp_path):
    """--adapter-timesteps: inside [lo, hi] the UNet runs the adapter at the asked scale, outside it runs the base,
    and on leaving the block the hook is gone (the adapter acts at every timestep again)."""
    import sys
    from conftest import ROOT
    from adapt import lora, model
    from adapt.facts import AdapterFacts
    sys.path.insert(0, str(ROOT / "recipes"))
    from compare_windows import active_only
    pipe, _ = model.load_base(str(tiny_base))
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, pipe.unet.config.cross_attention_dim, generator=g)
    run = lambda t: pipe.unet(x, torch.tensor([t]), e).sample
    with torch.no_grad():
        base = {t: run(t) for t in (50, 500)}
        lora.attach(pipe.unet, "cross_attn", rank=4, alpha=4)
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.2
        lora.save(tmp_path, pipe.unet, AdapterFacts(architecture="sd"))
        pipe, _ = model.load_base(str(tiny_base))
        name = lora.load_into(pipe, tmp_path)
        with lora.applied(pipe, [name], [0.7], fuse=False):
            full = {t: run(t) for t in (50, 500)}
            with active_only(pipe, name, 0.7, (0, 100)):
                gated = {t: run(t) for t in (500, 50)}  # outside first: the gate must switch back on for 50
            after = run(500)
    assert (full[500] - base[500]).abs().max() > 1e-3  # the adapter does something at both timesteps
    assert torch.equal(gated[50], full[50]) and torch.equal(gated[500], base[500])
    assert torch.equal(after, full[500])
