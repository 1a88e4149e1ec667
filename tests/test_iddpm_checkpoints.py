"""IDDPM weight files: round trip from improved-diffusion's own model, clear errors, download."""

import hashlib
import io
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from itdiffusion.models.iddpm import build_model_and_diffusion, resolve_checkpoint
from itdiffusion.models.upstream import improved_diffusion
from itdiffusion.models.weights import CheckpointError, download, load_checkpoint
from itdiffusion.stages import CONFIG_DIR

CONF = Path(CONFIG_DIR)


def tiny_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / "model" / "iddpm_tiny.yaml"), overrides)


def upstream_model(**overrides):
    """A tiny U-Net from improved-diffusion's own create_model_and_diffusion, randomly initialized."""
    script_util = improved_diffusion().script_util
    flags = {
        **script_util.model_and_diffusion_defaults(),
        "image_size": 32,
        "num_channels": 32,
        "num_res_blocks": 1,
        "attention_resolutions": "16",
        "learn_sigma": True,
        "diffusion_steps": 100,
        "noise_schedule": "cosine",
        **overrides,
    }
    torch.manual_seed(3)
    model, _ = script_util.create_model_and_diffusion(**flags)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # also the zero-initialized output layers
    return model.eval()


@pytest.fixture(scope="module")
def official_style_file(tmp_path_factory):
    """torch.save(model.state_dict()) as the official files were written, and the model itself."""
    model = upstream_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_state_dict_from_improved_diffusion_loads_and_gives_identical_outputs(official_style_file):
    path, reference = official_style_file
    model, _ = build_model_and_diffusion(tiny_cfg())
    sha = load_checkpoint(model, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        assert torch.equal(model(x, t), reference(x, t))


def test_training_checkpoint_with_model_key_loads(official_style_file, tmp_path):
    path, reference = official_style_file
    wrapped = tmp_path / "last.pt"
    torch.save({"model": reference.state_dict(), "step": torch.tensor(5)}, wrapped)
    model, _ = build_model_and_diffusion(tiny_cfg())
    load_checkpoint(model, wrapped)
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "overrides,flag,first_key",
    [
        ({"learn_sigma": False}, "learn_sigma", "out.2.weight"),
        ({"num_res_blocks": 2}, "num_res_blocks", None),
        ({"num_channels": 64}, "num_channels", "input_blocks.0.0.weight"),
        ({"attention_resolutions": "16,8"}, "attention_resolutions", None),
        ({"use_scale_shift_norm": False}, "use_scale_shift_norm", "emb_layers.1.weight"),
        ({"image_size": 64}, "image_size (or attention_resolutions)", None),  # the same pixels, other depths
    ],
)
def test_wrong_flag_names_the_flag_and_the_first_mismatched_keys(
    official_style_file, overrides, flag, first_key
):
    path, _ = official_style_file
    model, _ = build_model_and_diffusion(tiny_cfg(**overrides))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path)
    message = str(err.value)
    assert str(path) in message and "Probably wrong flag(s): " in message and "\n" not in message
    suspects = message.split("Probably wrong flag(s): ")[1].split(". Shape mismatches")[0]
    suspects = suspects.split(". Missing")[0].split(" | ")
    assert [s.split(":")[0] for s in suspects] == [flag], message  # exactly the wrong flag, no other
    assert any(kind in message for kind in ("Shape mismatches", "Missing from the file", "Unexpected"))
    if first_key:
        assert first_key in message


def test_wrong_flag_message_reads_well_for_learn_sigma(official_style_file):
    path, _ = official_style_file
    model, _ = build_model_and_diffusion(tiny_cfg(learn_sigma=False))
    expected = (
        r"learn_sigma: the file has learn_sigma=True \(6 output channels\), "
        r"the config gives learn_sigma=False \(3 output channels\)"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(model, path)


def test_truncated_file_says_delete_and_download_again(official_style_file, tmp_path):
    path, _ = official_style_file
    data = path.read_bytes()
    truncated = tmp_path / "cifar10_uncond_vlb_50M_500K.pt"
    truncated.write_bytes(data[: len(data) // 2])
    model, _ = build_model_and_diffusion(tiny_cfg())
    with pytest.raises(CheckpointError, match="truncated or corrupted") as err:
        load_checkpoint(model, truncated)
    assert str(truncated) in str(err.value) and "delete it and download it again" in str(err.value)


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 64, b"<html>403 Forbidden</html>"])
def test_random_bytes_say_not_a_pytorch_file(tmp_path, content):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(content)
    model, _ = build_model_and_diffusion(tiny_cfg())
    with pytest.raises(CheckpointError, match="is not a readable PyTorch file") as err:
        load_checkpoint(model, bad)
    assert str(bad) in str(err.value)


def test_pickled_objects_are_refused_by_weights_only(tmp_path):
    unsafe = tmp_path / "pickle.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "fn": io.BytesIO}, unsafe)  # a class: not weights-only
    model, _ = build_model_and_diffusion(tiny_cfg())
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(model, unsafe)


def test_missing_file_and_non_state_dict(tmp_path):
    model, _ = build_model_and_diffusion(tiny_cfg())
    with pytest.raises(FileNotFoundError):
        load_checkpoint(model, tmp_path / "nope.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        load_checkpoint(model, tmp_path / "list.pt")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not look like an improved-diffusion UNetModel"):
        load_checkpoint(model, tmp_path / "other.pt")


def test_resolve_local_path_and_download_from_url(official_style_file, tmp_path):
    path, _ = official_style_file
    assert resolve_checkpoint(tiny_cfg(checkpoint=str(path)), tmp_path) == path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tiny_cfg(checkpoint=str(tmp_path / "missing.pt")), tmp_path)
    with pytest.raises(ValueError, match="names no weights"):
        resolve_checkpoint(tiny_cfg(), tmp_path)

    cfg = tiny_cfg(checkpoint_url=path.as_uri())  # file:// stands in for the official https URL
    got = resolve_checkpoint(cfg, tmp_path / "ckpts", progress=False)
    assert got == tmp_path / "ckpts" / "iddpm" / path.name
    assert got.read_bytes() == path.read_bytes()
    assert [p.name for p in got.parent.iterdir() if p.suffix == ".tmp"] == []  # atomic: no leftovers
    got.write_bytes(b"kept")  # present: not downloaded again
    assert resolve_checkpoint(cfg, tmp_path / "ckpts").read_bytes() == b"kept"


def test_download_reports_sha256_and_fails_clearly(official_style_file, tmp_path):
    path, _ = official_style_file
    sha = download(path.as_uri(), tmp_path / "copy.pt", progress=False)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    dest = tmp_path / "absent" / "x.pt"
    with pytest.raises(CheckpointError, match=f"place it at {dest}"):
        download((tmp_path / "no-such-file.pt").as_uri(), dest, progress=False)
    assert not dest.exists()


def test_download_script_keeps_present_files_and_rejects_unknown_names(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "download_checkpoints", Path(__file__).resolve().parents[1] / "scripts" / "download_checkpoints.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name in ("cifar10_uncond_vlb_50M_500K.pt", "cifar10_uncond_50M_500K.pt"):  # the official names
        (tmp_path / "iddpm").mkdir(exist_ok=True)
        (tmp_path / "iddpm" / name).write_bytes(name.encode())
    assert script.main(["--checkpoint-dir", str(tmp_path)]) == 0  # nothing to download
    out = capsys.readouterr().out
    assert hashlib.sha256(b"cifar10_uncond_50M_500K.pt").hexdigest() in out
    assert "iddpm_cifar10_vlb" in out and "iddpm_cifar10_hybrid" in out
    with pytest.raises(SystemExit):
        script.main(["iddpm_cifar10_typo"])


def test_interrupted_http_download_leaves_no_file(tmp_path):
    import http.server
    import threading

    class Truncating(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Truncating)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    dest = tmp_path / "iddpm" / "weights.pt"
    try:
        with pytest.raises(CheckpointError, match="stopped after 10 of 1000 bytes"):
            download(f"http://127.0.0.1:{server.server_port}/weights.pt", dest, progress=False, timeout=10)
    finally:
        thread.join(timeout=10)
        server.server_close()
    assert not dest.exists() and list(dest.parent.iterdir()) == []
