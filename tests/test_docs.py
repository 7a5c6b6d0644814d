"""docs/config.md is generated from the config models and must not go stale."""

from pydantic import BaseModel

from pipeline.config import RunConfig
from pipeline.docgen import DOC, main, render_config_reference


def test_config_reference_is_up_to_date():
    assert DOC.read_text() == render_config_reference(), "run: python -m pipeline.docgen"
    assert main(["--check"]) == 0


def test_every_key_is_documented():
    text = DOC.read_text()
    for name, field in RunConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for key in section.model_fields:
                assert f"`{name}.{key}`" in text
        else:
            assert f"`{name}`" in text
