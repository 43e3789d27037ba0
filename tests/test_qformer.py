"""The Q-Former connector: numerical parity with HF's Blip2QFormerModel, BERT init, shapes and gradients."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import QFORMER
from transformers import (
    BertConfig,
    BertModel,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    GPT2Config,
    PretrainedConfig,
)

from kopru import KopruConfig, KopruForConditionalGeneration
from kopru.connectors.base import strategy_class
from kopru.connectors.qformer import (
    QFormer,
    QFormerConfig,
    QFormerConnector,
    load_bert_weights,
    qformer_state_dict_from_hf,
)

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VISION_DIM, QUERIES = 64, 4, 4, 128, 48, 8


def tiny_config(**overrides) -> QFormerConfig:
    fields = dict(
        num_queries=QUERIES,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        intermediate_size=INTERMEDIATE,
    )
    return QFormerConfig(**(fields | overrides))


def tiny_hf_qformer(frequency: int, attn_implementation: str, text_input: bool = False) -> Blip2QFormerModel:
    config = Blip2QFormerConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        encoder_hidden_size=VISION_DIM,
        cross_attention_frequency=frequency,
        use_qformer_text_input=text_input,
    )
    model = Blip2QFormerModel(config).eval()
    model.set_attn_implementation(attn_implementation)
    # HF's init leaves LayerNorms at 1/0 and biases at 0; randomise everything so the mapping is fully tested.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(mean=1.0 if param.dim() == 1 else 0.0, std=0.1)
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("frequency", [1, 2, 3])
def test_matches_hf_blip2_qformer(frequency: int, attn_implementation: str) -> None:
    torch.manual_seed(frequency)
    hf = tiny_hf_qformer(frequency, attn_implementation)
    query_tokens = torch.randn(1, QUERIES, HIDDEN)
    ours = QFormer(tiny_config(cross_attention_frequency=frequency), encoder_hidden_size=VISION_DIM).eval()
    ours.load_state_dict(qformer_state_dict_from_hf(hf.state_dict(), query_tokens=query_tokens), strict=True)
    assert [layer.cross_attention is not None for layer in ours.layers] == [
        i % frequency == 0 for i in range(LAYERS)
    ]

    images = torch.randn(3, 10, VISION_DIM)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, ::2] = False
    with torch.no_grad():
        for image_mask in (None, mask):
            expected = hf(
                query_embeds=query_tokens.expand(3, -1, -1),
                encoder_hidden_states=images,
                encoder_attention_mask=None if image_mask is None else image_mask.long(),
            ).last_hidden_state
            torch.testing.assert_close(ours(images, image_mask), expected, atol=1e-5, rtol=0)


def test_hf_conversion_drops_text_side_and_accepts_prefix() -> None:
    hf = tiny_hf_qformer(2, "eager", text_input=True)
    state = {f"qformer.{k}": v for k, v in hf.state_dict().items()}
    assert any(".intermediate.dense." in k for k in state)  # the text FFN exists in the source
    converted = qformer_state_dict_from_hf(state)
    ours = QFormer(tiny_config(), encoder_hidden_size=VISION_DIM)
    missing, unexpected = ours.load_state_dict(converted, strict=False)
    assert missing == ["query_tokens"] and unexpected == []
    torch.testing.assert_close(
        converted["layers.0.query_ffn.intermediate.weight"],
        state["qformer.encoder.layer.0.intermediate_query.dense.weight"],
    )
    with pytest.raises(KeyError, match="unexpected key"):
        qformer_state_dict_from_hf({"encoder.layer.0.mystery.weight": torch.zeros(1)})


def test_masked_image_positions_are_ignored() -> None:
    torch.manual_seed(0)
    qformer = QFormer(tiny_config(), encoder_hidden_size=VISION_DIM).eval()
    images = torch.randn(2, 7, VISION_DIM)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 4:] = False
    changed = images.clone()
    changed[:, 4:] = torch.randn(2, 3, VISION_DIM) * 100
    torch.testing.assert_close(qformer(images, mask), qformer(changed, mask), atol=1e-5, rtol=0)
    assert not torch.allclose(qformer(images), qformer(changed))


def save_tiny_bert(path, layers: int = 5, hidden: int = HIDDEN) -> BertModel:
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=32,
    )
    bert = BertModel(config)
    with torch.no_grad():
        for param in bert.parameters():
            param.normal_(std=0.1)  # so equality below cannot hold by accident (LayerNorm 1/0, zero biases)
    bert.save_pretrained(path, safe_serialization=True)
    return bert


def test_load_bert_weights(tmp_path) -> None:
    bert = save_tiny_bert(tmp_path)
    qformer = QFormer(tiny_config(), encoder_hidden_size=VISION_DIM)
    random = load_bert_weights(qformer, str(tmp_path))

    ours, theirs = qformer.state_dict(), bert.state_dict()
    torch.testing.assert_close(
        ours["query_norm.weight"], theirs["embeddings.LayerNorm.weight"], atol=0, rtol=0
    )
    for i in range(LAYERS):
        pairs = {
            "self_attention.query.weight": "attention.self.query.weight",
            "self_attention.value.bias": "attention.self.value.bias",
            "self_attention.dense.weight": "attention.output.dense.weight",
            "self_attention.norm.bias": "attention.output.LayerNorm.bias",
            "query_ffn.intermediate.weight": "intermediate.dense.weight",
            "query_ffn.output.bias": "output.dense.bias",
            "query_ffn.norm.weight": "output.LayerNorm.weight",
        }
        for a, b in pairs.items():
            torch.testing.assert_close(
                ours[f"layers.{i}.{a}"], theirs[f"encoder.layer.{i}.{b}"], atol=0, rtol=0
            )

    cross = [name for name, _ in qformer.named_parameters() if ".cross_attention." in name]
    assert len(cross) == 2 * 10  # layers 0 and 2, five Linear/LayerNorm modules each with weight and bias
    assert sorted(random) == sorted(["query_tokens", *cross])


def test_connector_init_from_bert(tmp_path) -> None:
    bert = save_tiny_bert(tmp_path)
    connector = QFormerConnector(
        tiny_config(init_from=str(tmp_path)), VISION_DIM, PretrainedConfig(hidden_size=80)
    )
    # Building loads nothing (a saved model reloads its trained weights instead); a new model asks for it.
    assert not torch.equal(connector.qformer.layers[3].query_ffn.output.weight, bert.encoder.layer[3].output.dense.weight)
    connector.init_pretrained_weights()
    torch.testing.assert_close(
        connector.qformer.layers[3].query_ffn.output.weight,
        bert.encoder.layer[3].output.dense.weight,
        atol=0,
        rtol=0,
    )


def test_load_bert_weights_errors(tmp_path) -> None:
    qformer = QFormer(tiny_config(), encoder_hidden_size=VISION_DIM)
    save_tiny_bert(tmp_path / "wide", hidden=2 * HIDDEN)
    with pytest.raises(ValueError, match=rf"expected hidden_size={HIDDEN}.*found {2 * HIDDEN}"):
        load_bert_weights(qformer, str(tmp_path / "wide"))
    save_tiny_bert(tmp_path / "shallow", layers=2)
    with pytest.raises(ValueError, match=rf"{LAYERS} layers but the BERT checkpoint only 2"):
        load_bert_weights(qformer, str(tmp_path / "shallow"))
    GPT2Config(n_embd=HIDDEN, n_layer=4, n_head=HEADS).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="BERT-family.*'gpt2'"):
        load_bert_weights(qformer, str(tmp_path / "gpt2"))
    with pytest.raises(FileNotFoundError, match="init_from path .* does not exist"):
        load_bert_weights(qformer, str(tmp_path / "missing"))


def test_connector_shapes_and_registry() -> None:
    config = tiny_config()
    assert strategy_class("qformer") is QFormerConnector
    assert QFormerConnector.output_tokens(config, vision_tokens=257) == QUERIES
    connector = QFormerConnector(config, VISION_DIM, PretrainedConfig(hidden_size=80))
    assert connector(torch.randn(3, 11, VISION_DIM)).shape == (3, QUERIES, 80)
    with pytest.raises(ValueError, match=rf"\[images, tokens, {VISION_DIM}\].*\[3, 11, 40\]"):
        connector(torch.randn(3, 11, 40))
    with pytest.raises(ValueError, match=r"image_mask must have shape \[3, 11\]"):
        connector(torch.randn(3, 11, VISION_DIM), torch.ones(3, 12, dtype=torch.bool))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 64, "num_heads": 5}, "hidden_size=64, num_heads=5"),
        ({"cross_attention_frequency": 0}, "cross_attention_frequency must be an integer >= 1, found 0"),
        ({"num_queries": 0}, "num_queries must be a positive integer, found 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), found 1.5"),
        ({"hidden_act": "swish"}, "hidden_act must be one of"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    connector = QFormerConnector(tiny_config(dropout=0.1), VISION_DIM, PretrainedConfig(hidden_size=80))
    images = torch.randn(2, 9, VISION_DIM, requires_grad=True)
    connector(images).sum().backward()
    for name, param in connector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_qformer_init_from_not_needed_after_save(vision_dirs, llm_dirs, make_image, tmp_path) -> None:
    """Before: from_pretrained read the BERT checkpoint named by init_from again (gone -> error)."""
    bert_dir = tmp_path / "bert"
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=50, hidden_size=QFORMER["hidden_size"], num_hidden_layers=QFORMER["num_layers"],
                         num_attention_heads=QFORMER["num_heads"], intermediate_size=QFORMER["intermediate_size"],
                         max_position_embeddings=16)).save_pretrained(bert_dir, safe_serialization=True)
    assert list(bert_dir.glob("*.safetensors"))
    torch.manual_seed(0)
    config = KopruConfig(vision=str(vision_dirs["clip"]), llm=str(llm_dirs["llama"]), strategy="qformer",
                         connector={**QFORMER, "init_from": str(bert_dir)})
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    bert = BertModel.from_pretrained(bert_dir)
    torch.testing.assert_close(model.connector.qformer.layers[0].self_attention.query.weight,
                               bert.encoder.layer[0].attention.self.query.weight)  # init_from took effect

    saved = tmp_path / "model"
    model.save_pretrained(saved, processor)
    shutil.rmtree(bert_dir)
    loaded, loaded_processor = KopruForConditionalGeneration.from_pretrained(saved)
    batch = processor("<image> describe it", [make_image(0)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**loaded_processor("<image> describe it", [make_image(0)])).logits,
                                   model(**batch).logits, atol=0, rtol=0)
