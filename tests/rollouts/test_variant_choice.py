"""The variant rule (docs/rollouts.md, "Who gets what"): what each device can run, then the
smallest file; a device nothing fits is skipped with what each variant lacks."""

from fleet.core.capabilities import tflite_runtime_level, version_tuple
from fleet.rollouts.cohort import DeviceCapabilities, VariantNeeds, choose_variant, misfit

OPS = frozenset({"FULLY_CONNECTED", "SOFTMAX"})
FLOAT32 = VariantNeeds(variant="float32", raw_size=10_000, quantization="none", ops=OPS)
INT8 = VariantNeeds(variant="int8", raw_size=3_000, quantization="int8", ops=OPS)
FLOAT16 = VariantNeeds(variant="float16", raw_size=5_000, quantization="float16", ops=OPS)


def test_a_device_that_runs_everything_gets_the_smallest_variant():
    variant, why = choose_variant(device=DeviceCapabilities(), variants=[FLOAT32, INT8, FLOAT16])
    assert variant == "int8"
    assert why == "smallest variant this device runs"


def test_a_device_without_int8_gets_the_smallest_float_variant_and_is_told_why_not_int8():
    variant, why = choose_variant(
        device=DeviceCapabilities(supports_int8=False), variants=[FLOAT32, INT8, FLOAT16]
    )
    assert variant == "float16"
    assert "int8: needs int8 support" in why


def test_a_variant_for_other_hardware_is_not_chosen():
    gpu_int8 = VariantNeeds(
        variant="int8", raw_size=3_000, quantization="int8", ops=OPS, hardware=frozenset({"gpu"})
    )
    assert (
        choose_variant(device=DeviceCapabilities(hardware="rpi4"), variants=[FLOAT32, gpu_int8])[0]
        == "float32"
    )
    assert (
        choose_variant(device=DeviceCapabilities(hardware="gpu"), variants=[FLOAT32, gpu_int8])[0] == "int8"
    )
    assert misfit(DeviceCapabilities(hardware="rpi4"), gpu_int8) == "hardware gpu-only"


def test_an_op_the_device_lacks_rules_a_variant_out():
    device = DeviceCapabilities(unsupported_ops=frozenset({"SOFTMAX"}))
    variant, why = choose_variant(device=device, variants=[FLOAT32, INT8])
    assert variant is None
    assert why == "int8: needs op SOFTMAX; float32: needs op SOFTMAX"


def test_an_allow_list_of_ops_rules_out_ops_outside_it():
    device = DeviceCapabilities(supported_ops=frozenset({"FULLY_CONNECTED"}))
    assert misfit(device, FLOAT32) == "needs op SOFTMAX"
    assert misfit(DeviceCapabilities(supported_ops=OPS), FLOAT32) is None


def test_an_old_runtime_rules_out_a_variant_that_needs_a_newer_one():
    new = VariantNeeds(variant="int8", raw_size=3_000, quantization="int8", ops=OPS, min_runtime=(2, 3, 0))
    old_device = DeviceCapabilities(runtime_level=tflite_runtime_level("tflite_runtime", "2.1.0"))
    assert misfit(old_device, new) == "runtime 2.1.0 < 2.3.0"
    assert choose_variant(device=old_device, variants=[FLOAT32, new])[0] == "float32"
    recent = DeviceCapabilities(runtime_level=tflite_runtime_level("tflite_runtime", "2.14.0"))
    assert misfit(recent, new) is None


def test_a_device_that_did_not_report_its_runtime_version_is_not_held_to_one():
    new = VariantNeeds(variant="int8", raw_size=3_000, quantization="int8", min_runtime=(2, 3, 0))
    assert misfit(DeviceCapabilities(runtime_level=tflite_runtime_level("tflite_runtime", "")), new) is None


def test_any_litert_release_runs_what_tensorflow_lite_2_18_ran():
    # ai_edge_litert numbers its releases afresh; 1.0 came from TensorFlow 2.18.
    assert tflite_runtime_level("ai_edge_litert", "1.2.0") == (2, 18, 0)
    assert tflite_runtime_level("tflite_runtime", "1.2.0") == (1, 2, 0)
    assert version_tuple("2.18.0rc1") == (2, 18, 0)
    assert version_tuple("not a version") is None


def test_ties_go_to_the_variant_name_so_the_choice_is_stable():
    a = VariantNeeds(variant="b-variant", raw_size=100)
    b = VariantNeeds(variant="a-variant", raw_size=100)
    assert choose_variant(device=DeviceCapabilities(), variants=[a, b])[0] == "a-variant"
    assert choose_variant(device=DeviceCapabilities(), variants=[b, a])[0] == "a-variant"


def test_a_version_without_ready_variants_skips_everyone_with_that_reason():
    assert choose_variant(device=DeviceCapabilities(), variants=[]) == (
        None,
        "the version has no ready variant",
    )
