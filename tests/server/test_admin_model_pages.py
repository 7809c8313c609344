"""The model, version and artifact pages (issue 10, section 1): variants in rounded units,
where each version runs as device counts that link to the same devices, the rollouts that
used it with their outcomes, and a prompt to deprecate a released version whose canary was
rolled back, with a button (operators only) that calls the same service as the API. The
artifact's signature and manifest are in words; JSON only under "raw". Django's test client,
real PostgreSQL, the real pipeline (LiteRT) on the digits sample."""

from __future__ import annotations

import re

import pytest
from django.contrib.admin.models import LogEntry
from django.test import Client

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device
from fleet.registry import services as registry
from fleet.registry.choices import VersionStatus
from fleet.rollouts import services
from tests.server import admin_world
from tests.server.conftest import pending_artifact, ready_artifact

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]


SECONDS_AND_ZONE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


def web(persona) -> Client:
    client = Client()
    client.force_login(persona.user)
    return client


def page(persona, url: str) -> str:
    response = web(persona).get(url)
    assert response.status_code == 200, url
    return response.content.decode()


def version_url(version) -> str:
    return f"/admin/registry/modelversion/{version.pk}/change/"


@pytest.fixture
def world(digits_model, digits, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        world = admin_world.build(digits_model, digits)
    # Two of the ten report int8 of 1.0.0 (no such artifact: the count still shows), and a
    # retired device that still "reports" 1.0.0 runs nothing for us.
    devices = world["devices"]
    Device.objects.filter(pk__in=[devices[8].pk, devices[9].pk]).update(
        reported_models={"digits": {"version": "1.0.0", "variant": "int8"}}
    )
    Device.objects.create(
        device_id="old-cam",
        status=DeviceStatus.RETIRED,
        reported_models={"digits": {"version": "1.0.0", "variant": "float32"}},
    )
    return world


@pytest.fixture
def golden_artifacts(version_v1, digits, alice):
    models = digits.build_digits_models()
    return {
        variant: ready_artifact(version_v1, variant, models[variant], alice.user)
        for variant in ("float32", "int8")
    }


def test_the_version_page_shows_each_variant_in_rounded_units(golden_artifacts, bob):
    int8 = golden_artifacts["int8"]
    html = page(bob, version_url(int8.version))
    row = re.search(r'<tr data-variant="int8">(.*?)</tr>', html, re.S).group(1)
    cell = lambda name: re.search(rf'data-figure="{name}">([^<]*)<', row).group(1)  # noqa: E731
    assert cell("size") == f"{int8.raw_size / 1024:.1f} KB"
    assert (
        cell("compressed")
        == f"{int8.blob_size / 1024:.1f} KB ({int8.raw_size / int8.blob_size:.2f}x smaller)"
    )
    assert cell("accuracy") == f"{int8.golden_accuracy * 100:.1f} % (n = {int8.golden_samples:,})"
    ops = int8.tflite_signature["ops"]
    assert f"{len(ops)} ops: {', '.join(ops)}" in row
    assert "int8" in row and "float32" in html  # both variants
    assert not re.search(r"\d\.\d{3,}", re.sub(r"<[^>]+>", "", row))  # no unrounded number


def test_where_a_version_runs_counts_active_devices_and_links_to_them(world, bob):
    v1 = world["v1"]
    html = page(bob, version_url(v1))
    links = dict(
        (variant, (int(n), url.replace("&amp;", "&")))
        for url, variant, n in re.findall(
            r'<a href="([^"]+)" data-running="([^"]+)">(\d+) active device', html
        )
    )
    assert {variant: n for variant, (n, _) in links.items()} == {
        "float32": 8,
        "int8": 2,
    }  # not the retired one
    for variant, (n, url) in links.items():
        response = web(bob).get(url)
        assert response.context["cl"].result_count == n, variant  # the list behind the figure
    assert "no active device reports running it" in page(bob, version_url(world["v2"]))


def test_the_model_page_shows_every_version_with_its_devices_and_rollouts(world, alice, bob):
    rollout = admin_world.start(world, alice.user)
    html = page(bob, f"/admin/registry/mlmodel/{world['v1'].model_id}/change/")
    assert f'id="version-{world["v1"].pk}"' in html and f'id="version-{world["v2"].pk}"' in html
    assert 'data-running="float32">8 active devices' in html
    assert f'<tr data-rollout="{rollout.pk}">' in html
    assert f'href="/admin/rollouts/rollout/{rollout.pk}/change/"' in html


def test_the_rollouts_of_a_version_show_their_outcome_and_link_to_them(world, alice, bob):
    rollout = admin_world.start(world, alice.user)
    services.rollout_rollback(rollout=rollout, by=alice.user, reason="accuracy fell")
    html = page(bob, version_url(world["v2"]))
    row = re.search(rf'<tr data-rollout="{rollout.pk}">(.*?)</tr>', html, re.S).group(1)
    assert f'href="/admin/rollouts/rollout/{rollout.pk}/change/"' in row
    assert "Rolled back" in row and "stage 1 of 2" in row
    assert "3 rolled back" in row and "7 pending (later stage)" in row
    assert re.search(r"by alice at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: accuracy fell", row)  # who, when, why
    rollout.refresh_from_db()
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", row)  # times with seconds and zone
    assert "Never rolled out." in page(bob, version_url(world["v1"]))


def test_the_deprecate_prompt_appears_only_after_a_failed_canary(world, alice):
    v2 = registry.version_set_status(version=world["v2"], status=VersionStatus.RELEASED)
    assert "deprecate-prompt" not in page(alice, version_url(v2))  # released, never rolled out
    rollout = admin_world.start(world, alice.user)
    assert "deprecate-prompt" not in page(alice, version_url(v2))  # running: not failed
    services.rollout_rollback(rollout=rollout, by=alice.user, reason="golden check failed on devices")
    html = page(alice, version_url(v2))
    assert 'id="deprecate-prompt"' in html and 'id="deprecate-button"' in html
    prompt = re.search(r'id="deprecate-prompt".*?</div>', html, re.S).group(0)
    assert f"{rollout}</a> was rolled back by alice at " in prompt
    assert prompt.count(" UTC") == 1 and ": golden check failed on devices" in prompt


def test_the_deprecate_prompt_waits_for_a_release_and_ends_with_a_newer_rollout(world, alice):
    """A draft cannot become deprecated (the state machine), and a newer rollout of the
    same version that is running replaces the verdict of the rolled-back one."""
    services.rollout_rollback(rollout=admin_world.start(world, alice.user), reason="failed")
    assert "deprecate-prompt" not in page(alice, version_url(world["v2"]))  # a draft
    registry.version_set_status(version=world["v2"], status=VersionStatus.RELEASED)
    assert "deprecate-prompt" in page(alice, version_url(world["v2"]))  # control
    admin_world.start(world, alice.user)
    assert "deprecate-prompt" not in page(alice, version_url(world["v2"]))


def test_the_deprecate_button_confirms_then_calls_the_service(world, alice):
    v2 = registry.version_set_status(version=world["v2"], status=VersionStatus.RELEASED)
    services.rollout_rollback(rollout=admin_world.start(world, alice.user), reason="failed")
    client = web(alice)
    url = f"/admin/registry/modelversion/{v2.pk}/deprecate/"
    confirm = client.get(url).content.decode()
    assert 'id="action-impact"' in confirm and "should not be rolled out again" in confirm
    v2.refresh_from_db()
    assert v2.status == VersionStatus.RELEASED  # a GET changes nothing
    response = client.post(url, follow=True)
    v2.refresh_from_db()
    assert v2.status == VersionStatus.DEPRECATED and v2.status_changed_at is not None
    assert "is now deprecated" in response.content.decode()
    assert "deprecate-prompt" not in response.content.decode()
    assert LogEntry.objects.filter(object_id=str(v2.pk), user=alice.user).exists()
    # Twice is refused by the service with its own message, as in the API.
    response = client.post(url, follow=True)
    assert "cannot become deprecated" in response.content.decode()


def test_a_viewer_sees_the_prompt_but_no_button_and_cannot_deprecate(world, alice, bob):
    v2 = registry.version_set_status(version=world["v2"], status=VersionStatus.RELEASED)
    services.rollout_rollback(rollout=admin_world.start(world, alice.user), reason="failed")
    html = page(bob, version_url(v2))
    assert 'id="deprecate-prompt"' in html  # control: the prompt is there
    assert "deprecate-button" not in html and "/deprecate/" not in html
    for method in ("get", "post"):
        assert (
            getattr(web(bob), method)(f"/admin/registry/modelversion/{v2.pk}/deprecate/").status_code == 403
        )
    v2.refresh_from_db()
    assert v2.status == VersionStatus.RELEASED


def test_the_artifact_page_shows_the_signature_and_manifest_in_words(golden_artifacts, bob):
    int8 = golden_artifacts["int8"]
    html = page(bob, f"/admin/registry/artifact/{int8.pk}/change/")
    assert "x: float32 [1, 64]" in html and "probs: float32 [1, 10]" in html
    assert "quantization: int8" in html
    assert f"{int8.golden_accuracy * 100:.1f} % of {int8.golden_samples:,} samples" in html
    for value in (int8.raw_sha256, int8.blob_sha256, int8.manifest_sha256, int8.signing_key.keyid):
        assert f'<code title="{value}">{value[:12]}…</code>' in html  # shortened
        assert f'data-copy="{value}"' in html  # with its copy button
    assert "requires: hardware any; runtime litert&gt;=1.0" in html
    assert re.search(rf"signed: {SECONDS_AND_ZONE} by key", html)
    # JSON only in the folded raw section.
    before_raw, raw = html.split("<summary>raw</summary>", 1)
    assert '"payloadType"' not in before_raw and "{&quot;" not in before_raw
    assert "&quot;payloadType&quot;" in raw and '<details class="raw">' in before_raw[-200:]
    assert "/static/fleet/copy.js" in html


def test_version_and_model_pages_cost_a_bounded_number_of_queries(
    world, alice, bob, django_assert_max_num_queries
):
    services.rollout_rollback(rollout=admin_world.start(world, alice.user), reason="failed")
    admin_world.start(world, alice.user)  # two rollouts: the count does not grow with them
    client = web(bob)
    # The version page also draws the compatibility matrix: its ready artifacts, the active
    # devices, the static groups' members and the groups (plus one per dynamic group); and
    # the deltas to its variants (one query).
    for url, queries in (
        (version_url(world["v2"]), 19),
        (f"/admin/registry/mlmodel/{world['v1'].model_id}/change/", 14),
    ):
        client.get(url)  # warm caches (content types, sessions)
        with django_assert_max_num_queries(queries):
            assert client.get(url).status_code == 200


@pytest.mark.parametrize(
    "url", ["/admin/registry/mlmodel/", "/admin/registry/modelversion/", "/admin/registry/artifact/"]
)
def test_registry_lists_show_times_to_the_second_with_their_zone(golden_artifacts, bob, url):
    html = page(bob, url)
    assert re.search(r"<td[^>]*>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</td>", html), url
    assert " p.m." not in html and " a.m." not in html  # not Django's default format


def test_labels_read_in_words_and_are_edited_one_per_line(digits_model, alice, bob):
    url = f"/admin/registry/mlmodel/{digits_model.pk}/change/"
    html = page(bob, url)
    assert f"{len(digits_model.labels)} labels: {', '.join(digits_model.labels)}" in html
    assert "[&quot;" not in html and '["' not in html  # no JSON list
    form = page(alice, url)
    assert "\n".join(digits_model.labels) in form  # control: the operator's textarea
    response = web(alice).post(
        url, {"name": "digits", "task": "classification", "labels": "zero\n one \n\ntwo", "description": ""}
    )
    assert response.status_code == 302
    digits_model.refresh_from_db()
    assert digits_model.labels == ["zero", "one", "two"]


def test_after_the_gates_roll_back_the_prompt_gives_their_sentence(world, alice):
    v2 = registry.version_set_status(version=world["v2"], status=VersionStatus.RELEASED)
    rollout = services.rollout_rollback(
        rollout=admin_world.start(world, alice.user), reason="gate"
    )  # by system
    sentence = "Rolled back at stage 1 by the accuracy gate: 72.0 % (n = 239) vs 97.5 % (n = 2,037)."
    type(rollout).objects.filter(pk=rollout.pk).update(last_decision=sentence)  # what the evaluator writes
    prompt = re.search(r'id="deprecate-prompt".*?</div>', page(alice, version_url(v2)), re.S).group(0)
    assert re.search(rf"was rolled back at {SECONDS_AND_ZONE}\. {re.escape(sentence)}", prompt)


def test_an_artifact_still_in_the_pipeline_says_so(version_v1, digits, bob):
    artifact = pending_artifact(version_v1, "int8", digits.build_digits_models()["int8"])
    html = page(bob, f"/admin/registry/artifact/{artifact.pk}/change/")
    assert "not inspected yet" in html and "not signed yet" in html and "not compressed yet" in html
    html = page(bob, version_url(version_v1))
    assert '<tr data-variant="int8">' in html and "Pending" in html
