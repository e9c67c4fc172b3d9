"""Base loading: the same path for the tiny model as for a real checkpoint; clear errors."""

import pytest

from adapt import model


def test_facts_of_tiny_pipeline(tiny_base, tiny_v_base):
    _, f = model.load_base(str(tiny_base))
    assert (f.architecture, f.prediction_type, f.vae_factor, f.latent_channels) == ("sd", "epsilon", 8, 4)
    assert f.scaling_factor == 0.5 and f.shift_factor == 0.0 and f.num_train_timesteps == 1000
    assert f.text_hidden_size == 32 and f.sample_size == 64
    _, fv = model.load_base(str(tiny_v_base))
    assert fv.prediction_type == "v_prediction"


def test_missing_path(tmp_path):
    with pytest.raises(model.ModelError, match="not found"):
        model.load_base(str(tmp_path / "nope" / "deeper"))


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(model.ModelError, match="not a diffusers pipeline"):
        model.load_base(str(tmp_path))


def test_hub_id_offline_names_the_id():
    with pytest.raises(model.ModelError, match=r"stable-diffusion-v1-5/stable-diffusion-v1-5.*unreachable"):
        model.load_base("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_unknown_embedded_name():
    with pytest.raises(model.ModelError, match="no embedded model"):
        model.load_base("adapt:does-not-exist")


def test_pickle_single_file_refused(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"x")
    with pytest.raises(model.ModelError, match="pickle"):
        model.load_base(str(f))
