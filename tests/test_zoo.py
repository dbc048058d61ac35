import pytest

from tuneloop.errors import NotFoundError
from tuneloop.zoo import ZOO, resolve_model


def test_unknown_name_lists_known_models():
    with pytest.raises(NotFoundError) as e:
        resolve_model("gpt-17")
    assert "minilm-l6" in str(e.value) and "smollm2-135m-instruct" in str(e.value)


def test_local_folder_and_hub_id_pass_through(tiny_llama_dir, tmp_path):
    assert resolve_model(str(tiny_llama_dir)) == str(tiny_llama_dir)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(NotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_bundled_models_resolve_to_hf_folders(smol_dir):
    from pathlib import Path

    assert (smol_dir / "config.json").exists() and (smol_dir / "model.safetensors").exists()
    assert "chat_template" in (smol_dir / "tokenizer_config.json").read_text() or (smol_dir / "chat_template.jinja").exists()
    enc = Path(resolve_model("minilm-l6"))
    assert (enc / "config.json").exists()
    assert set(ZOO) >= {"smollm2-135m-instruct", "minilm-l6"}
