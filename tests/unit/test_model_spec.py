from ctloop.contracts.triton import ModelSpec, TensorSpec

SPEC = ModelSpec(
    name="igniter",
    inputs=(TensorSpec("IMAGE", "TYPE_FP32", (1, -1, -1, -1)),),
    outputs=(TensorSpec("LABELS", "TYPE_UINT8", (-1, -1, -1)),),
)


def test_config_pins_the_served_version():
    cfg = SPEC.config(version=4)
    assert cfg["version_policy"] == {"specific": {"versions": [4]}}
    assert cfg["backend"] == "python"
    assert cfg["input"][0] == {"name": "IMAGE", "data_type": "TYPE_FP32", "dims": [1, -1, -1, -1]}


def test_pbtxt_names_every_tensor():
    text = SPEC.config_pbtxt()
    assert 'name: "igniter"' in text
    assert '{ name: "IMAGE", data_type: TYPE_FP32, dims: [ 1, -1, -1, -1 ] }' in text
    assert '{ name: "LABELS", data_type: TYPE_UINT8, dims: [ -1, -1, -1 ] }' in text


def test_an_optional_input_says_so_in_both_forms():
    spec = ModelSpec(
        name="m",
        inputs=(
            TensorSpec("INPUT", "TYPE_FP32", (-1, -1, -1)),
            TensorSpec("SHAPE", "TYPE_INT64", (3,), optional=True),
        ),
        outputs=(TensorSpec("LABELS", "TYPE_UINT8", (-1, -1, -1)),),
    )
    inputs = spec.config()["input"]
    assert "optional" not in inputs[0] and inputs[1]["optional"] is True
    text = spec.config_pbtxt()
    assert '{ name: "SHAPE", data_type: TYPE_INT64, dims: [ 3 ], optional: true }' in text
    assert '{ name: "INPUT", data_type: TYPE_FP32, dims: [ -1, -1, -1 ] }' in text
