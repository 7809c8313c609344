"""No JSON typed or read by people in the admin (issue 10, section 2): every list, add and
change page of every model, as an admin and as a viewer, shows no JSON document outside
the collapsed ``<details class="raw">`` for experts, and no unrounded number. Django's
test client, real PostgreSQL."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.contrib import admin
from django.test import Client
from django.utils import timezone

from agent.trustctl import make_keyring, make_root
from fleet.devices import services as device_services
from fleet.devices.choices import GroupKind, IngestRefusalReason
from fleet.devices.models import DeviceGroup, IngestRefusal
from fleet.registry import signing
from fleet.rollouts.models import RolloutPolicy
from tests.server import admin_world

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]
# {" [" [] {} : a JSON object or list (of strings, or empty)
JSON_OPENING = re.compile(r'[\[{]\s*["\]}]')
# A number with four decimals or more: people read rounded numbers with units.
UNROUNDED = re.compile(r"\d\.\d{4,}")


class VisibleText(HTMLParser):
    """What a person reads on the page: text and the values of fields they see, without
    scripts, styles, hidden inputs and the folded ``<details class="raw">`` sections."""

    SKIPPED = ("script", "style", "template")

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skipping: list[str] = []  # the open elements whose content is not shown

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag in self.SKIPPED or (tag == "details" and "raw" in (attributes.get("class") or "").split()):
            self.skipping.append(tag)
        elif tag == "details" and self.skipping:
            self.skipping.append(tag)  # nested in a skipped one: closes before it
        if tag == "input" and not self.skipping and attributes.get("type") not in ("hidden", "submit"):
            self.parts.append(attributes.get("value") or "")

    def handle_endtag(self, tag):
        if self.skipping and self.skipping[-1] == tag:
            self.skipping.pop()

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def visible_text(page: str) -> str:
    parser = VisibleText()
    parser.feed(page)
    return " ".join(parser.parts)


def raw_json_shown(page: str, pattern: re.Pattern = JSON_OPENING) -> list[str]:
    """Each place the visible text opens a JSON document (or matches ``pattern``), with a
    little context."""
    text = visible_text(page)
    return [text[max(0, m.start() - 60) : m.end() + 60] for m in pattern.finditer(text)]


def test_the_checker_finds_json_outside_the_raw_section_and_ignores_it_inside():
    # Positive controls: JSON in text, in a text field and in a text box is found.
    assert raw_json_shown('<p>rules: {"tags": ["x"]}</p>')
    assert raw_json_shown('<input type="text" name="rules" value="{&quot;tags&quot;: []}">')
    assert raw_json_shown('<textarea name="tags">["a", "b"]</textarea>')
    # Folded for experts, in scripts, or in hidden inputs: not shown to people.
    assert not raw_json_shown('<details class="raw"><summary>raw</summary><pre>{"a": 1}</pre></details>')
    assert not raw_json_shown(
        '<script>const x = {"a": 1};</script><input type="hidden" value="[&quot;a&quot;]">'
    )
    assert raw_json_shown('<details><summary>more</summary>["a"]</details>')  # only the raw one is folded
    assert raw_json_shown("<td>0.912345</td>", UNROUNDED)
    assert not raw_json_shown("<td>91.2 %</td>", UNROUNDED)


@pytest.fixture
def world(digits_model, digits, alice, ada, key_file, django_capture_on_commit_callbacks):
    """One of everything: a running rollout with evidence, groups of both kinds, a token
    with tags, a policy with a maintenance window, a root and keyring of trust, an ingest
    refusal."""
    _, active = signing.signing_key_active()
    root_key = Ed25519PrivateKey.generate()
    for envelope in (
        make_root(keys=[root_key]),
        make_keyring(root_keys=[root_key], version=1, signing_keys=[active.public_key()]),
    ):
        assert ada.client().post("/api/v1/trust", json.loads(envelope), format="json").status_code == 201
    with django_capture_on_commit_callbacks(execute=True):
        world = admin_world.build(digits_model, digits)
        rollout = admin_world.start(world, alice.user)
        admin_world.evidence(rollout)
    static = DeviceGroup.objects.create(name="lab", kind=GroupKind.STATIC)
    static.members.set(world["devices"][:2])
    DeviceGroup.objects.create(
        name="outdoor", kind=GroupKind.DYNAMIC, rules={"tags": ["fleet"], "online": True, "status": "active"}
    )
    device_services.enrollment_token_create(name="factory", tags=["fleet", "cam"])
    now = timezone.now()
    IngestRefusal.objects.create(
        device=world["devices"][0], reason=IngestRefusalReason.CLOCK, count=3, first_at=now, last_at=now
    )
    world["rollout"] = rollout
    RolloutPolicy.objects.filter(pk=world["policy"].pk).update(
        maintenance_window={"start": "22:00", "end": "05:00"}
    )
    return world


def admin_pages(world) -> list[str]:
    """The dashboard, every model's list, add page (when it has one), and the change and
    history pages of its first row; the rollout's confirmations and a device's retirement."""
    rollout = world["rollout"]
    urls = [
        "/admin/",
        *(f"/admin/rollouts/rollout/{rollout.pk}/act/{action}/" for action in ("pause", "rollback")),
        f"/admin/devices/device/{world['devices'][0].pk}/delete/",
    ]
    for model in admin.site._registry:
        base = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        urls += [base, f"{base}add/"]
        first = model.objects.first()
        if first is not None:
            urls += [f"{base}{first.pk}/change/", f"{base}{first.pk}/history/"]
    return urls


@pytest.mark.parametrize("persona", ["ada", "alice", "bob"])
def test_no_admin_page_shows_raw_json(world, persona, request):
    client = Client()
    client.force_login(request.getfixturevalue(persona).user)
    shown, pages = {}, 0
    for url in admin_pages(world):
        response = client.get(url)
        assert response.status_code in (200, 302, 403), f"{url}: {response.status_code}"
        if response.status_code == 200:
            pages += 1
            page = response.content.decode()
            found = raw_json_shown(page) + raw_json_shown(page, UNROUNDED)
            if found:
                shown[url] = found
    assert pages >= 30  # control: the pages were read, not refused
    assert not shown, "\n".join(f"{url}: {found[0]!r}" for url, found in shown.items())
