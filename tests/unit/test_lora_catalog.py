"""The front's LoRA checks (pipelines/contract/lora_catalog.py), torch-free: names stay in the LoRA folder,
headers are read
without tensors, families are told apart from metadata, key names and fused-layer shapes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.lora_catalog import FOLDER, catalog, inspect, locate, resolve
from tests.damaged_loras import DAMAGES, write_damaged


def lora(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    lora(tmp_path / FOLDER / "style.safetensors", {"transformer.x.lora_A.weight": (4, 8)})
    lora(
        tmp_path / FOLDER / "folder" / "pytorch_lora_weights.safetensors",
        {"transformer.x.lora_A.weight": (2, 8)},
    )
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    return tmp_path


@pytest.mark.parametrize("name", ["style", "style.safetensors", "folder"])
def test_a_name_finds_a_file_or_a_folder(weights: Path, name: str) -> None:
    assert locate(name, weights).is_file()


@pytest.mark.parametrize(
    "name",
    ["../secret", "../secret.safetensors", "folder/../../secret", "/etc/passwd", "", "a\\b", "nope", "x/y"],
)
def test_names_outside_the_folder_or_unknown_are_refused(weights: Path, name: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        locate(name, weights)
    assert info.value.param == "loras"


def test_a_url_the_front_did_not_fetch_is_refused_naming_fetch_allow(weights: Path) -> None:
    with pytest.raises(InvalidParameter, match="--fetch-allow") as info:
        locate("ftp://huggingface.co/x/y/resolve/main/a.safetensors", weights)
    assert info.value.param == "loras"


def test_broken_headers_and_foreign_keys_are_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    foreign = lora(tmp_path / "foreign.safetensors", {"model.layers.0.weight": (2, 2)})
    for path in (broken, foreign):
        with pytest.raises(InvalidParameter) as info:
            inspect(path, path.stem)
        assert info.value.param == "loras"


FLUX1_BFL = {  # FLUX.1 [dev]'s fused single-block layers, hidden 3072, rank 16
    "lora_unet_single_blocks_0_linear1.lora_down.weight": (16, 3072),
    "lora_unet_single_blocks_0_linear1.lora_up.weight": (21504, 16),
}
FLUX2_BFL = {  # FLUX.2 [dev]'s, hidden 6144
    "diffusion_model.single_blocks.0.linear1.lora_A.weight": (16, 6144),
    "diffusion_model.single_blocks.0.linear1.lora_B.weight": (55296, 16),
}


@pytest.mark.parametrize(
    ("shapes", "metadata", "family"),
    [
        (FLUX1_BFL, None, "flux1"),
        (FLUX2_BFL, None, "flux2"),
        (
            {"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": (4, 8)},
            None,
            "flux2",
        ),
        ({"transformer.transformer_blocks.0.norm1.linear.lora_A.weight": (4, 8)}, None, "flux1"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 8)}, None, None),
        ({"transformer.x.lora_A.weight": (4, 8)}, {"modelspec.architecture": "Flux.1-dev/lora"}, "flux1"),
    ],
)
def test_the_family_is_read_from_the_header(tmp_path: Path, shapes, metadata, family) -> None:
    path = lora(tmp_path / "x.safetensors", shapes, metadata)
    info = inspect(path, "x")
    assert info.family == family
    assert info.rank == next(iter(shapes.values()))[0]


def test_resolve_refuses_the_other_family_bad_scales_and_too_many(tmp_path: Path) -> None:
    lora(tmp_path / FOLDER / "one.safetensors", FLUX1_BFL)
    for entries, family in (
        ([("one", 1.0)], "flux2"),
        ([("one", 4.5)], "flux1"),
        ([("one", 1.0)] * 4, "flux1"),
        ([("one", 1.0), ("one.safetensors", 0.5)], "flux1"),
    ):
        with pytest.raises(InvalidParameter) as info:
            resolve(entries, family, "model", tmp_path)
        assert info.value.param == "loras"
    [choice] = resolve([("one", -4.0)], "flux1-kontext", "flux.1-kontext-dev", tmp_path)
    assert choice.scale == -4.0 and choice.key.startswith("lora_")


def test_an_edited_file_is_another_adapter(tmp_path: Path) -> None:
    path = lora(tmp_path / FOLDER / "one.safetensors", FLUX1_BFL)
    before = inspect(path, "one").key
    lora(path, {**FLUX1_BFL, "lora_unet_single_blocks_1_linear2.lora_down.weight": (16, 15360)})
    assert inspect(path, "one").key != before
    assert json.dumps(inspect(path, "one").describe())


def test_a_repo_in_the_hugging_face_cache_is_found_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--flux-style"
    lora(repo / "snapshots" / "abc123" / "style.safetensors", FLUX2_BFL)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    weights = tmp_path / "weights"
    assert locate("someone/flux-style", weights).name == "style.safetensors"
    [listed] = [entry for entry in catalog(weights) if not isinstance(entry, tuple)]
    assert (listed.name, listed.family) == ("someone/flux-style", "flux2")


def test_an_async_job_keeps_its_loras_through_the_job_table(tmp_path: Path) -> None:
    """Async jobs store their resolved request as JSON: the LoRAs come back as what the worker loads."""
    from pipelines.contract.specs import SPECS
    from server.declarations.protocol import ImageGenerationRequest
    from server.front.normalize import build_request
    from server.front.service import Prepared
    from server.jobs.service import _dump, _load

    lora(tmp_path / FOLDER / "one.safetensors", FLUX2_BFL)
    body = ImageGenerationRequest(prompt="x", loras=[{"path": "one", "scale": 0.5}])
    render, reply = build_request(body, SPECS["flux.2-dev"], {}, weights_dir=tmp_path)
    loaded, _ = _load(_dump(Prepared(render, reply, SPECS["flux.2-dev"]), "http://x"), SPECS)
    assert loaded.render.loras == render.loras and loaded.render.loras[0].scale == 0.5


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_header_is_a_400_naming_the_file(tmp_path: Path, damage: str) -> None:
    path = write_damaged(tmp_path / FOLDER)[damage]
    with pytest.raises(InvalidParameter) as info:
        inspect(path, damage)
    assert info.value.param == "loras" and path.name in info.value.message


def test_a_damaged_file_is_listed_alone_as_unusable(tmp_path: Path) -> None:
    lora(tmp_path / FOLDER / "good.safetensors", {"transformer.x.lora_A.weight": (4, 8)})
    damaged = write_damaged(tmp_path / FOLDER)
    listed = list(catalog(tmp_path))
    assert "good" in [entry.name for entry in listed if not isinstance(entry, tuple)]
    reasons = dict(entry for entry in listed if isinstance(entry, tuple))  # the Hugging Face cache's too
    assert all(f"{name}.safetensors" in reasons[name] for name in damaged)


def test_a_name_past_the_file_systems_limit_names_no_lora(weights: Path) -> None:
    with pytest.raises(InvalidParameter, match="No LoRA named") as info:
        locate("é" * 200, weights)
    assert info.value.param == "loras"


def test_a_name_is_at_most_255_characters_and_a_url_may_be_longer(tmp_path: Path) -> None:
    from pipelines.contract.specs import SPECS
    from server.declarations.protocol import ImageGenerationRequest
    from server.front.normalize import build_request

    name = ImageGenerationRequest(prompt="x", loras=[{"path": "a" * 256}])
    with pytest.raises(InvalidParameter, match="at most 255 characters") as info:
        build_request(name, SPECS["flux.2-dev"], {}, weights_dir=tmp_path)
    assert info.value.param == "loras"
    signed = "https://bucket.example/style.safetensors?X-Amz-Signature=" + "f" * 3000
    assert ImageGenerationRequest(prompt="x", loras=[{"path": signed}]).loras


def test_every_other_field_is_checked_before_a_url_is_fetched(tmp_path: Path) -> None:
    from pipelines.contract.specs import SPECS
    from server.declarations.protocol import ImageGenerationRequest
    from server.front.normalize import RemoteInputs, build_request

    fetched: list[str] = []

    def fetch() -> RemoteInputs:
        fetched.append("fetched")
        return RemoteInputs()

    url = "https://bucket.example/style.safetensors"
    bad = [
        ({"size": "100000x8"}, "size"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"cfg_scale": 1000}, "cfg_scale"),
        ({"image_prompt_strength": 0.5}, "image_prompt_strength"),
        ({"loras": [{"path": url, "scale": 9}]}, "loras"),
        ({"loras": [{"path": url}] * 4}, "loras"),
    ]
    for fields, param in bad:
        body = ImageGenerationRequest.model_validate({"prompt": "x", "loras": [{"path": url}], **fields})
        with pytest.raises(InvalidParameter) as info:
            build_request(body, SPECS["flux.2-dev"], {}, weights_dir=tmp_path, fetch=fetch)
        assert info.value.param == param, fields
    assert not fetched
