import json

import pytest

from unclip.cli import main
from unclip.config import PRESETS, UnclipConfig, preset, resolutions
from unclip.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip_is_exact(name):
    cfg = preset(name)
    again = UnclipConfig.from_json(cfg.to_json())
    assert again == cfg
    assert isinstance(again.decoder.channel_mult, tuple)
    assert isinstance(again.upsamplers, tuple) and isinstance(again.upsamplers[0].channel_mult, tuple)


def test_presets_chain_resolutions_by_four():
    assert resolutions(preset("shapes")) == (32, 128)
    assert resolutions(preset("tiny")) == (16, 64)


def test_overrides_set_typed_values_at_any_depth():
    cfg = preset("shapes").override([
        "clip.train.steps=7", "decoder.channel_mult=[1,2]", "decoder.attention_resolutions=[16]", "decoder.z_drop=0.05",
        "upsamplers.0.base_channels=16", "name=mine", "prior.train.lr=1",
    ])
    assert cfg.clip.train.steps == 7
    assert cfg.decoder.channel_mult == (1, 2)
    assert cfg.decoder.z_drop == 0.05
    assert cfg.upsamplers[0].base_channels == 16
    assert cfg.name == "mine"
    assert cfg.prior.train.lr == 1.0 and isinstance(cfg.prior.train.lr, float)
    assert preset("shapes").clip.train.steps != 7  # frozen: the preset is untouched


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        preset("shapes").override(["clip.train.stpes=5"])
    message = str(err.value)
    assert "clip.train.stpes" in message and "steps" in message and "batch_size" in message


@pytest.mark.parametrize("assignment, words", [
    ("clip.train.steps=1.5", "integer"),
    ("clip.train.steps=true", "integer"),
    ("decoder.sampler=euler", "'ddim'"),
    ("decoder.channel_mult=3", "list"),
    ("decoder=1", "section"),
    ("upsamplers.4.base_channels=1", "index"),
    ("decoder.z_drop=1.5", "probability"),
    ("clip.patch_size=5", "multiple"),
    ("decoder.resolution=64", "upsamplers.0.in_resolution"),
    ("clip.train.steps", "key=value"),
    ("clip.train.steps=-3", "negative"),
    ("data.scenes=[0.5,0.5]", "three non-negative odds"),
    ("data.scenes=[0,0,0]", "not all zero"),
    ("data.scenes=[1,-1,1]", "single, pair and count"),
    ("clip.train.lr=-1", "learning rate of 0 or more"),
    ("decoder.train.lr=NaN", "finite number"),
    ("prior.train.batch_size=0", "at least 1"),
    ("clip.train.ckpt_every=0", "at least 1"),
    ("upsamplers.0.train.steps=0", "upsamplers.0.train.steps=0 must be at least 1"),
    ("decoder.train.ema_decay=1", "[0, 1)"),
    ("ar_prior.train.grad_clip=-0.5", "must not be negative"),
    ("clip.embed_dim=0", "clip.embed_dim=0 must be at least 1"),  # trained at chance, exit 0
    ("tokenizer.vocab_size=0", "at least 1"),
    ("decoder.channel_mult=[]", "one multiplier of 1 or more per level"),
    ("upsamplers.0.channel_mult=[1,0]", "one multiplier of 1 or more per level"),
    ("data.path=/my/pairs", "add data.source=folder"),  # trained on shapes world, exit 0, without a word
    # an upsampler's settings that failed only mid-training, or after it (the model then went unwritten)
    ("upsamplers.0.bsr_blur_sigma=[1.5]", "must be a range [low, high] (low ≤ high) of blur σ above 0"),
    ("upsamplers.0.bsr_noise=[0.5,0.1]", "(low ≤ high) of noise std"),
    ("upsamplers.0.bsr_jpeg_quality=[0,120]", "JPEG qualities from 1 to 100"),
    ("upsamplers.0.sample_start=0", "a noise level in (0, 1]"),
    ("upsamplers.0.sample_steps=500", "from noise level 0.1 of 1000 timesteps it can take at most 101 steps"),
    ("upsamplers.0.crop_fraction=0.3", "its training crops (38²) must be divisible by 8"),
    ("upsamplers.0.crop_fraction=0", "crop_fraction=0.0 must be in (0, 1]"),
    ("upsamplers.0.blur_kernel=4", "blur_kernel=4 must be odd"),
    ("prior.eta=2", "prior.eta: DDIM η 2.0: give a number from 0"),  # sampled NaN z_i, evaluated as perfect
    ("ar_prior.pca_variance=1.5", "must be a fraction in (0, 1]"),
    ("ar_prior.buckets=1", "must be at least 2"),
    # a ZeroDivisionError traceback: width % heads ran before the field's own check
    ("clip.vision_heads=0", "clip.vision_heads=0 must be at least 1"),
    ("clip.patch_size=0", "clip.patch_size=0 must be at least 1"),
    # refused by the sampler only after training, so the trained model went unwritten
    ("decoder.sample_steps=2000", "decoder.sample_steps=2000 is more than its 1000 training timesteps"),
    ("prior.sample_steps=1001", "prior.sample_steps=1001 is more than its 1000 training timesteps"),
    ("decoder.attention_resolutions=[5]", "names none of the decoder's levels (32², 16², 8²)"),  # no attention
    ("decoder.attention_resolutions=[8,5]",  # 5 was silently ignored
     "decoder.attention_resolutions=[8, 5]: 5 is not among the decoder's levels (32², 16², 8²) and would be ignored; "
     "list only those sides, e.g. [8]"),
    ("clip.init_temperature=0", "clip.init_temperature=0.0 must be above 0"),  # log(1/0) at the CLIP's build
    ("tokenizer.context_length=2", "use at least 3"),  # refused only once the tokenizer was trained
    ("clip.train.seed=9223372036854775808", "give a seed from 0 to 9223372036854775807"),  # torch's overflow
    ("decoder.vlb_weight=-1", "decoder.vlb_weight=-1.0 must not be negative"),
    ("name=../elsewhere", "give a name a folder can have"),  # runs/<name>/ outside runs/
    ("name=a/b", "no slashes"),
    ("decoder.candidates=65", "decoder.candidates=65: draw 1 to 64 candidates"),  # every generate refused it
])
def test_bad_overrides_are_errors(assignment, words):
    with pytest.raises(ConfigError, match=None) as err:
        preset("shapes").override([assignment])
    assert words in str(err.value)


def test_a_second_upsampler_is_added_after_the_first_with_the_papers_bsr():
    cfg = preset("shapes").override(["upsamplers.1.sample_steps=5"])
    first, second = cfg.upsamplers
    assert (second.in_resolution, second.out_resolution, second.degradation) == (128, 512, "bsr")
    assert first.degradation == "blur" and first == preset("shapes").upsamplers[0]  # the first keeps the preset's
    assert (second.target, second.sample_start, second.sample_steps) == (first.target, first.sample_start, 5)
    with pytest.raises(ConfigError, match="a model holds at most 2"):
        cfg.override(["upsamplers.2.sample_steps=5"])
    with pytest.raises(ConfigError, match="index must be 0..0, or 1 to add a stage after the last"):
        preset("shapes").override(["upsamplers.2.sample_steps=5"])


def test_related_fields_change_together():
    cfg = preset("shapes").override([
        "decoder.resolution=64", "upsamplers.0.in_resolution=64", "upsamplers.0.out_resolution=256",
        "decoder.attention_resolutions=[32,16]"])  # the levels are now 64², 32², 16²: 8 would be ignored
    assert resolutions(cfg) == (64, 256)


def test_from_dict_is_strict_and_fills_defaults():
    data = preset("tiny").to_dict()
    del data["decoder"]["guidance_scale"]  # an older file without a newer field
    assert UnclipConfig.from_dict(data).decoder.guidance_scale == preset("tiny").decoder.guidance_scale
    data["decoder"]["colour"] = 1
    with pytest.raises(ConfigError, match="unknown config key.*colour.*valid keys"):
        UnclipConfig.from_dict(data)
    with pytest.raises(ConfigError, match="not valid JSON"):
        UnclipConfig.from_json("{")


def test_config_cli_prints_json_with_overrides(capsys, tmp_path):
    assert main(["config", "--preset", "tiny", "--set", "clip.train.steps=9"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["clip"]["train"]["steps"] == 9
    out = tmp_path / "cfg.json"
    assert main(["config", "--preset", "tiny", "--out", str(out)]) == 0
    assert main(["config", "--config", str(out), "--set", "name=again"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["name"] == "again"
    assert main(["config", "--set", "bogus=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_config_refuses_an_unusable_guidance_scale():
    for key, value in (("decoder.guidance_scale", "1e999"), ("prior.guidance_scale", "-1")):  # 1e999: inf
        with pytest.raises(ConfigError, match=f"{key}: guidance scale"):
            preset("tiny").override([f"{key}={value}"])
    assert isinstance(preset("tiny").override(["decoder.guidance_scale=0"]), UnclipConfig)


def test_unknown_keys_suggest_the_key_meant():
    for assignment, meant in (("clip.train.stpes=5", "did you mean clip.train.steps?"),
                              ("decoder.steps=5", "did you mean decoder.train.steps or decoder.timesteps?"),
                              ("upsampler.0.base_channels=8", "did you mean upsamplers.0.base_channels?"),
                              ("clip.lr=1e-3", "did you mean clip.train.lr?")):
        with pytest.raises(ConfigError) as err:
            preset("tiny").override([assignment])
        assert meant in str(err.value), assignment
    with pytest.raises(ConfigError, match=r"did you mean clip\.train\.steps\?"):
        UnclipConfig.from_json('{"clip": {"steps": 3}}')


def test_text_fields_take_numbers_as_text():
    """`--set name=2024` was "name must be a string; got 2024"."""
    cfg = preset("tiny").override(["name=2024", "data.source=folder", "data.path=123"])
    assert (cfg.name, cfg.data.path) == ("2024", "123")
    assert preset("tiny").override(['name="42"', "name=a=b c"]).name == "a=b c"


def test_a_key_given_twice_in_a_config_file_is_an_error():
    """json.loads keeps the last of two keys in silence: the first section was dropped."""
    with pytest.raises(ConfigError, match="key 'clip' is given twice"):
        UnclipConfig.from_json('{"clip": {"embed_dim": 8}, "clip": {"train": {"steps": 5}}}')


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_overridden_configs_round_trip_exactly(name):
    cfg = preset(name).override(["name=ไทย แบบ", "data.scenes=[0.1,0.8,0.1]", "upsamplers.1.sample_steps=5",
                                 "decoder.attention_resolutions=[]", "clip.train.lr=0.1", "prior.train.compile=true"])
    assert UnclipConfig.from_dict(cfg.to_dict()) == cfg
    assert UnclipConfig.from_json(cfg.to_json()) == cfg


def test_config_keys_lists_every_key_with_its_type_default_and_meaning(capsys):
    from unclip.config import _walk

    assert main(["config", "--preset", "tiny", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split("=", 1)[0] for line in lines if not line.startswith(" ")]
    assert keys == [path for path, _ in _walk(preset("tiny"), "")]
    assert 'decoder.sampler="ddim"  (one of ddpm, ddim, dpmsolver++)' in lines
    assert "clip.train.steps=4  (integer; default 2800)" in lines
    at = lines.index("clip.hard_negatives=0.0  (number)")
    assert lines[at + 1].startswith("    Fraction of the shapes-world training stream")
    # every key says what it means: the plain sizes (widths, layers, heads, sides, steps) said nothing
    unexplained = [line for line, after in zip(lines, [*lines[1:], ""]) if not line.startswith(" ")
                   and not after.startswith("    ")]
    assert unexplained == []
    assert lines[lines.index("decoder.attention_resolutions=[8]  (list of integers; default [16])") + 1] == \
        "    sides of the levels with cross-attention to the caption and z_i"


def test_a_saved_model_with_an_attention_side_of_no_level_still_loads():
    """check_new refuses [8, 5] for training; a model saved with it sampled fine (5 had no attention)."""
    data = preset("shapes").to_dict()
    data["decoder"]["attention_resolutions"] = [8, 5]
    assert UnclipConfig.from_dict(data).decoder.attention_resolutions == (8, 5)


def test_config_file_may_be_a_model_directory_or_carry_a_byte_order_mark(tmp_path, capsys):
    from unclip.modeldir import MANIFEST, Manifest, save_model_dir

    model = save_model_dir(tmp_path / "model", Manifest(config=preset("tiny").to_dict()), lambda tmp: None)
    for given in (model, model / MANIFEST):
        assert main(["config", "--config", str(given), "--set", "decoder.sample_steps=3"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["name"] == "tiny" and shown["decoder"]["sample_steps"] == 3
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + preset("tiny").to_json().encode())  # Windows Notepad
    assert main(["config", "--config", str(tmp_path / "bom.json")]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny"


def test_a_reader_that_stops_early_gets_no_error_from_unclip():
    """`unclip config | head` printed "unclip: error: Broken pipe" (and Python's own at exit)."""
    import subprocess
    import sys

    unclip = subprocess.Popen([sys.executable, "-m", "unclip", "config", "--keys"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    unclip.stdout.close()  # gone before unclip has imported, let alone printed: its write meets a closed pipe
    err = unclip.stderr.read().decode()
    assert unclip.wait(timeout=60) == 141 and err == "", err
