"""Smoke test of benchmarks/overhead.py: a tiny run of its main, checked through the JSON it writes."""

import contextlib
import json
import threading
from unittest import mock

import pytest
import torch
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, Trainer

from hf_rifle import RifleTrainerCallback
from tests.benchmarks import load_script

FULL_METHOD_VARIANTS = {"rifle_l2sp", "callback_l2", "callback_l2sp"}
VARIANTS = {"trainer"} | FULL_METHOD_VARIANTS
ROUNDS, STEPS = 2, 3
TINY = ["--model", "test_resnet", "--image-size", "32", "--batch-size", "4", "--steps-per-round", str(STEPS)]

pytestmark = pytest.mark.slow  # a real (tiny) benchmark run: half a minute


@pytest.fixture(scope="module")
def overhead():
    return load_script("overhead")


@pytest.fixture(scope="module")
def result(overhead, tmp_path_factory):
    output = tmp_path_factory.mktemp("overhead") / "o.json"
    overhead.main([*TINY, "--rounds", str(ROUNDS), "--warmup-steps", "1", "--device", "cpu", "--output", str(output)])
    return json.loads(output.read_text())


def test_every_variant_has_raw_step_times_and_ratios(result):
    assert set(result["variants"]) == VARIANTS
    for variant in result["variants"].values():
        assert len(variant["step_seconds"]) == ROUNDS
        assert all(len(steps) == STEPS and all(t > 0 for t in steps) for steps in variant["step_seconds"])
        assert variant["median_step_seconds"] > 0 and variant["images_per_second"] > 0
        ratio = variant["ratio_to_trainer"]
        assert len(ratio["per_round"]) == ROUNDS and all(r > 0 for r in ratio["per_round"])
        assert ratio["min"] <= ratio["q1"] <= ratio["median"] <= ratio["q3"] <= ratio["max"]
        assert len(variant["memory_bytes_per_round"]) == ROUNDS
        assert len(variant["warmup_round_step_seconds"]) == 1
    assert result["variants"]["trainer"]["ratio_to_trainer"]["per_round"] == [1.0] * ROUNDS


def test_the_target_holds_both_paths_of_the_full_method(result):
    target = result["target"]
    assert set(target["variants"]) == FULL_METHOD_VARIANTS
    for name, check in target["variants"].items():
        assert check["ratio"] == result["variants"][name]["ratio_to_trainer"]["median"]
        assert check["met"] == (check["ratio"] <= target["max_ratio"])
    assert target["met"] == all(check["met"] for check in target["variants"].values())


@pytest.mark.parametrize("variant, regularizer", [("callback_l2", "l2"), ("callback_l2sp", "l2sp")])
def test_callback_variants_run_the_full_method_on_a_plain_trainer(overhead, tmp_path, variant, regularizer):
    """As a user plugs it in: plain Trainer, no clipping, and every step the head's update rescaled (both head
    parameters), plus the L2-SP gradient with regularizer='l2sp'."""
    settings = overhead.parse_args(TINY)
    dataset = overhead.SyntheticImages(STEPS * 4, 4, 32, settings.num_labels, 0)
    model = overhead.build_model("test_resnet", settings.num_labels, 0)
    recorder = overhead.StepRecorder("cpu", settings.clock)
    trainer = overhead.build_trainer(variant, model, dataset, settings, "cpu", recorder, str(tmp_path))
    rifle = [c for c in trainer.callback_handler.callbacks if isinstance(c, RifleTrainerCallback)]
    assert type(trainer) is Trainer and trainer.args.max_grad_norm == 0 and trainer.args.optim == "sgd"
    assert len(rifle) == 1 and rifle[0].regularizer == regularizer and rifle[0].method == "RIFLE"
    rescale = mock.patch.object(
        overhead.ATTACH_MODULE, "rescale_head_update_", wraps=overhead.ATTACH_MODULE.rescale_head_update_
    )
    l2sp = mock.patch.object(
        overhead.ATTACH_MODULE, "add_l2sp_gradient_", wraps=overhead.ATTACH_MODULE.add_l2sp_gradient_
    )
    with rescale as rescaled, l2sp as l2sp_added:
        trainer.train()
    assert [len(call.args[0]) for call in rescaled.call_args_list] == [2] * STEPS  # fc weight and bias
    assert l2sp_added.call_count == (STEPS if regularizer == "l2sp" else 0)
    assert len(recorder.step_seconds) == STEPS


def test_each_variant_runs_in_each_place_of_the_round_equally_often(overhead, result):
    orders = result["round_orders"]
    assert len(orders) == ROUNDS and all(sorted(order) == sorted(VARIANTS) for order in orders)
    assert orders[1] == orders[0][1:] + orders[0][:1]  # the recorded order rotates by one
    variants = sorted(VARIANTS)
    places = [overhead.rotated(variants, round_index) for round_index in range(len(variants))]
    assert all(sorted(column) == variants for column in zip(*places))


def test_reinit_rescaling_and_l2sp_are_timed_alone(result):
    assert result["reinit"]["median_seconds"] > 0
    for timed in (result["head_rescale"], result["l2sp"]["direct"]):
        assert timed["median_seconds"] > 0 and timed["fraction_of_trainer_step"] > 0


def test_rescaling_timing_rescales_every_head_parameter(overhead):
    """A scale of exactly 1 skips the rescale, so the timing must record a different one for all of the head."""
    settings = overhead.parse_args([*TINY, "--micro-repeats", "2"])
    model = overhead.build_model("test_resnet", settings.num_labels, 0)
    with mock.patch.object(overhead, "rescale_head_update_", wraps=overhead.rescale_head_update_) as rescaled:
        assert len(overhead.time_head_rescale(model, settings, "cpu")) == 2
    assert [[update.scale for update in call.args[0]] for call in rescaled.call_args_list] == [[2.0, 2.0]] * 2


def test_l2sp_reference_bytes_are_the_backbone_parameter_bytes(result):
    model = TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture="test_resnet", num_labels=result["settings"]["num_labels"])
    )
    head_prefix = result["model"]["head_module"] + "."
    assert head_prefix == "timm_model.fc."
    backbone_bytes = sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith(head_prefix)
    )
    assert result["l2sp"]["reference_bytes"] == backbone_bytes


def test_json_records_the_machine_and_settings(result):
    assert result["machine"]["device"] == "cpu" and result["machine"]["cpu_count"] >= 1
    assert result["machine"]["torch"] == torch.__version__
    assert result["settings"]["model"] == "test_resnet" and result["date"]


def test_autograd_reference_trainer_gives_the_same_update_as_rifle_trainer(overhead, tmp_path):
    """The 'before' the benchmark compares against must train the same model: penalty in the loss vs its
    gradient added directly."""
    from hf_rifle import RifleConfig, RifleTrainer

    from ..helpers import RandomImages, timm_wrapper_resnet

    def trained(trainer_class, direct_gradient):
        model = timm_wrapper_resnet()
        args = RifleConfig(
            output_dir=str(tmp_path),
            max_steps=3,
            num_periods=1,
            regularizer="l2sp",
            l2sp_alpha=0.5,
            l2sp_beta=0.5,
            optim="sgd",
            learning_rate=0.1,
            per_device_train_batch_size=4,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        )
        with direct_gradient:
            trainer_class(model=model, args=args, train_dataset=RandomImages()).train()
        return list(model.parameters())

    after = trained(RifleTrainer, contextlib.nullcontext())
    before = trained(
        overhead.AutogradL2SPTrainer, mock.patch.object(overhead.ATTACH_MODULE, "add_l2sp_gradient_", lambda *a: None)
    )
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_cpu_clock_is_refused_where_a_gpu_may_do_the_work(overhead, device):
    with pytest.raises(SystemExit):
        overhead.parse_args([*TINY, "--clock", "cpu", "--device", device])


def test_turn_taking_runs_one_step_at_a_time_in_a_rotating_order(overhead):
    """Each thread holds the turn from the start of its step to the start of its next: the first turns set up the
    runs, then every cycle runs one step of each, the order rotated by one from cycle to cycle."""
    turns = overhead.TurnTaking(["a", "b", "c"])
    log, running = [], []

    def run(variant):
        turns.wait_for_turn(variant)  # setup
        try:
            for step in range(3):
                turns.pass_turn(variant)
                turns.wait_for_turn(variant)
                running.append(variant)
                log.append(f"{variant}{step}")
                assert running == [variant]  # nothing else runs meanwhile
                running.remove(variant)
        finally:
            turns.pass_turn(variant, finished=True)

    threads = [threading.Thread(target=run, args=(variant,)) for variant in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert log == ["b0", "c0", "a0", "c1", "a1", "b1", "a2", "b2", "c2"]


def test_interleaved_steps_time_every_variant_and_leave_memory_untold(overhead, tmp_path):
    output = tmp_path / "o.json"
    overhead.main([*TINY, "--rounds", "2", "--interleave", "steps", "--device", "cpu", "--output", str(output)])
    result = json.loads(output.read_text())
    for variant in result["variants"].values():
        assert [len(steps) for steps in variant["step_seconds"]] == [STEPS, STEPS]
        assert variant["memory_bytes_per_round"] == [None, None] and variant["memory_extra_over_trainer_bytes"] is None
    with pytest.raises(SystemExit):
        overhead.parse_args([*TINY, "--interleave", "steps", "--l2sp-impl", "both"])
