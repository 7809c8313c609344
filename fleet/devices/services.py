"""Device writes: enrollment, approval, disabling, retiring, credentials, assignment.

Secrets (enrollment tokens, pre-authorization codes, device tokens, broker passwords) are
random, shown once and stored only as sha256 (the broker keeps its own salted hash of the
password). Enrollment and rotation change the broker inside their transaction, with the
device's row locked, so that if the broker refuses nothing is kept; lifecycle actions change
the row first and the broker right after. Provisioning touches only a broker client that
belongs to the device, and device ids never name a service account (issue 9, section 1).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from agent.protocol.schemas import DEVICE_ID_PATTERN
from fleet.core.capabilities import HARDWARE_CLASS, check_ops, version_tuple
from fleet.core.errors import Conflict, InvalidInput, NotFound, ServiceError
from fleet.core.lookups import any_of
from fleet.devices.choices import DEVICE_TRANSITIONS, DeviceErrorCode, DeviceStatus, GroupKind
from fleet.devices.desired import desired_entries, desired_publish, desired_states_check, json_dict
from fleet.devices.models import (
    Device,
    DeviceGroup,
    DeviceToken,
    EnrollmentToken,
    devices_locked,
    is_reserved_device_id,
)
from fleet.devices.selectors import validate_group_rules
from fleet.mqtt import services as broker
from fleet.mqtt.broker import BrokerError, ClientNotOwned

log = logging.getLogger(__name__)
ENROLLMENT_PREFIX = "me_"
DEVICE_TOKEN_PREFIX = "md_"
CODE_PREFIX = "mc_"
IDENTITY_FIELDS = ("display_name", "hardware", "runtime", "runtime_version", "agent_version")


class BrokerUnavailable(ServiceError):
    status_code = 503
    code = "broker_unavailable"


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


@dataclass
class Credentials:
    """What a device receives once: its API token and its broker login."""

    device: Device
    token: str
    mqtt_username: str
    mqtt_password: str


# --- device ids


def _check_device_id(device_id: str) -> None:
    """Refuse an id that breaks the contract's pattern or names a broker service account
    (issue 9, section 1): on the broker a device's username is its id."""
    if not re.match(DEVICE_ID_PATTERN, device_id or ""):
        raise InvalidInput(
            "device_id: use letters, digits, '.', '_' or '-'.", code="invalid_device_id", field="device_id"
        )
    if is_reserved_device_id(device_id):
        raise InvalidInput(
            f"{device_id!r} is the name of a broker service account; choose another device id.",
            code=DeviceErrorCode.RESERVED_DEVICE_ID,
            field="device_id",
        )


def _refuse_retired(device: Device) -> None:
    raise Conflict(
        f"Device {device.device_id!r} is retired; a retired id never comes back.",
        code=DeviceErrorCode.DEVICE_RETIRED,
        field="device_id",
    )


def _refuse_existing(device: Device, *, code: str, message: str) -> None:
    """An id that is taken; a retired one says so, since it is taken for good."""
    if device.status == DeviceStatus.RETIRED:
        _refuse_retired(device)
    raise Conflict(message, code=code, field="device_id")


# --- enrollment tokens and pre-authorization


TAG_MAX_LENGTH = 64


def _enrollment_token_check(
    *, expires_at: datetime | None = None, max_uses: int | None = None, tags: Any = None
) -> list[str] | None:
    """What creation and edits of a token refuse: an expiry not in the future, fewer than
    one use, tags that are not words (strings of 1 to 64 characters without a comma, the
    separator of the admin's field). Answers the tags stripped, repeats dropped, in order."""
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput(
            "Choose a time in the future for the expiry.", code="invalid_expiry", field="expires_at"
        )
    if max_uses is not None and max_uses < 1:
        raise InvalidInput("Allow at least 1 use.", code="invalid_max_uses", field="max_uses")
    if tags is None:
        return None
    words = [tag.strip() for tag in tags if isinstance(tag, str)] if isinstance(tags, list | tuple) else None
    if (
        words is None
        or len(words) != len(tags)
        or any(not word or len(word) > TAG_MAX_LENGTH or "," in word for word in words)
    ):
        raise InvalidInput(
            f"Tags are a list of words of 1 to {TAG_MAX_LENGTH} characters, without commas.",
            code="invalid_tags",
            field="tags",
        )
    return list(dict.fromkeys(words))


def enrollment_token_check(
    *,
    token: EnrollmentToken | None = None,
    expires_at: datetime | None = None,
    max_uses: int | None = None,
    tags: Any = None,
) -> list[str] | None:
    """The checks of ``enrollment_token_create`` (no ``token``) or ``enrollment_token_update``
    (of ``token``), for a form that shows them as field errors before it saves."""
    if token is not None and expires_at == token.expires_at:
        expires_at = None  # an expiry left as it was is not checked again (see the update)
    return _enrollment_token_check(expires_at=expires_at, max_uses=max_uses, tags=tags)


def enrollment_token_create(
    *,
    name: str,
    auto_approve: bool = False,
    expires_at: datetime | None = None,
    max_uses: int | None = None,
    tags: list[str] | None = None,
    created_by: AbstractBaseUser | None = None,
) -> tuple[EnrollmentToken, str]:
    """A new token. Without an expiry or a use limit it gets the defaults
    (ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS, ENROLLMENT_TOKEN_DEFAULT_MAX_USES): a token baked
    into an image leaks sooner or later, and then it must stop working on its own."""
    if expires_at is None:
        expires_at = timezone.now() + timedelta(days=settings.ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS)
    if max_uses is None:
        max_uses = settings.ENROLLMENT_TOKEN_DEFAULT_MAX_USES
    tags = enrollment_token_check(expires_at=expires_at, max_uses=max_uses, tags=tags or [])
    key = _secret(ENROLLMENT_PREFIX)
    token = EnrollmentToken.objects.create(
        name=name,
        prefix=key[:10],
        key_sha256=sha256(key),
        auto_approve=auto_approve,
        expires_at=expires_at,
        max_uses=max_uses,
        tags=tags,
        created_by=created_by,
    )
    return token, key


def enrollment_token_update(
    *,
    token: EnrollmentToken,
    name: str | None = None,
    auto_approve: bool | None = None,
    expires_at: datetime | None = None,
    max_uses: int | None = None,
    tags: list[str] | None = None,
) -> EnrollmentToken:
    """Change what is given (None leaves a field as it is), with the checks of creation.

    An expiry left as it was is not checked again, so an expired token can still be renamed
    (it stays expired). Only the edited fields are written: the use count and the
    revocation, which enrollments and a revoke change meanwhile, are never overwritten by
    an edit made from an older copy. A revoked token stays revoked whatever the edit."""
    tags = enrollment_token_check(token=token, expires_at=expires_at, max_uses=max_uses, tags=tags)
    changes = {
        field: value
        for field, value in (
            ("name", name),
            ("auto_approve", auto_approve),
            ("expires_at", expires_at),
            ("max_uses", max_uses),
            ("tags", tags),
        )
        if value is not None
    }
    if changes:
        EnrollmentToken.objects.filter(pk=token.pk).update(**changes)
    token.refresh_from_db()
    return token


def enrollment_token_revoke(*, token: EnrollmentToken) -> EnrollmentToken:
    EnrollmentToken.objects.filter(pk=token.pk, revoked_at=None).update(revoked_at=timezone.now())
    token.refresh_from_db()
    return token


def device_preauthorize(
    *, device_id: str, display_name: str = "", tags: list[str] | None = None
) -> tuple[Device, str]:
    """Register a device id in advance with a one-time enrollment code (e.g. printed on the
    box by the factory). The device enrolls with its id and that code."""
    _check_device_id(device_id)
    code = _secret(CODE_PREFIX)
    try:
        with transaction.atomic():
            device = Device.objects.create(
                device_id=device_id,
                display_name=display_name,
                tags=list(tags or []),
                enrollment_code_sha256=sha256(code),
            )
    except IntegrityError as exc:
        existing = Device.objects.filter(device_id=device_id).first()
        if existing is not None:
            _refuse_existing(
                existing, code="duplicate_device", message=f"Device {device_id!r} already exists."
            )
        raise Conflict(
            f"Device {device_id!r} already exists.", code="duplicate_device", field="device_id"
        ) from exc
    return device, code


# --- enrollment


def _claim_enrollment_token(key: str) -> EnrollmentToken:
    token = EnrollmentToken.objects.filter(key_sha256=sha256(key)).first()
    now = timezone.now()
    if token is None or token.revoked_at is not None:
        raise ServiceError("Unknown or revoked enrollment token.", code="invalid_enrollment_token")
    if token.expires_at is not None and token.expires_at <= now:
        raise ServiceError("This enrollment token has expired.", code="enrollment_token_expired")
    # Compare-and-set on the use count: two devices racing for the last use cannot both win.
    claimed = (
        EnrollmentToken.objects.filter(pk=token.pk)
        .filter(Q(max_uses=None) | Q(uses__lt=F("max_uses")))
        .update(uses=F("uses") + 1)
    )
    if not claimed:
        raise ServiceError("This enrollment token has no uses left.", code="enrollment_token_used_up")
    return token


def _release_enrollment_token(token: EnrollmentToken) -> None:
    """Give back the use of an enrollment that failed."""
    EnrollmentToken.objects.filter(pk=token.pk, uses__gt=0).update(uses=F("uses") - 1)


def _identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The enrollment identity's fields, checked as the status' capabilities are
    (docs/protocol.md, addition 10): a hardware class, a runtime version, TFLite op names."""
    fields = {key: str(identity[key])[:200] for key in IDENTITY_FIELDS if identity.get(key)}
    if fields.get("runtime_version") == "unknown":  # a runtime built without package metadata
        del fields["runtime_version"]
    if "hardware" in fields and not HARDWARE_CLASS.fullmatch(fields["hardware"]):
        raise InvalidInput(
            "hardware: letters, digits, '.', '_' or '-', up to 64.", code="invalid", field="identity.hardware"
        )
    if "runtime_version" in fields and version_tuple(fields["runtime_version"]) is None:
        raise InvalidInput(
            "runtime_version: a version such as 2.18.0.", code="invalid", field="identity.runtime_version"
        )
    if "supports_int8" in identity:
        fields["supports_int8"] = bool(identity["supports_int8"])
    for key in ("supported_ops", "unsupported_ops"):
        if key in identity:
            try:
                fields[key] = check_ops(identity[key], field=key)
            except ValueError as exc:
                raise InvalidInput(str(exc), code="invalid", field=f"identity.{key}") from exc
    return fields


def _issue_credentials(device: Device) -> Credentials:
    """A new device token and broker password; old tokens stop working."""
    key = _secret(DEVICE_TOKEN_PREFIX)
    DeviceToken.objects.filter(device=device, revoked_at=None).update(revoked_at=timezone.now())
    DeviceToken.objects.create(device=device, prefix=key[:10], key_sha256=sha256(key))
    return Credentials(device, key, device.device_id, secrets.token_urlsafe(24))


def _broker(call, **kwargs) -> None:
    try:
        call(**kwargs)
    except ClientNotOwned as exc:
        # The name belongs to a broker account that is not this device's (a service account
        # not listed in the settings, or one an operator made): the same refusal as a
        # reserved id, and the account is untouched.
        name = kwargs.get("device_id")
        raise InvalidInput(
            f"{name!r} is the name of a broker account that is not a device's; choose another device id."
            if name
            else f"{exc}: choose other device ids.",
            code=DeviceErrorCode.RESERVED_DEVICE_ID,
            field="device_id",
        ) from exc
    except (BrokerError, OSError) as exc:
        raise BrokerUnavailable(f"The MQTT broker did not accept the change: {exc}. Try again.") from exc


def _device_by_code(device_id: str, code: str) -> Device:
    """The pre-authorized device, locked, with its code used up. A pending device becomes
    active (the code is its approval); a disabled one stays disabled (the code proves which
    device it is, not that an operator wants it back); a retired one never comes back."""
    device = Device.objects.select_for_update().filter(device_id=device_id).first()
    if (
        device is None
        or not device.enrollment_code_sha256
        or not hmac.compare_digest(device.enrollment_code_sha256, sha256(code))
    ):
        raise ServiceError("Unknown device id or wrong enrollment code.", code="invalid_enrollment_code")
    if device.status == DeviceStatus.RETIRED:
        _refuse_retired(device)
    device.enrollment_code_sha256 = ""  # one time only
    if device.status == DeviceStatus.PENDING:
        device.status = DeviceStatus.ACTIVE
        device.status_changed_at = timezone.now()
    return device


def _new_device(device_id: str, token: EnrollmentToken) -> Device:
    existing = Device.objects.filter(device_id=device_id).first()
    if existing is not None:
        _refuse_existing(
            existing,
            code="already_enrolled",
            message=f"Device {device_id!r} is already enrolled; an operator can rotate its credentials.",
        )
    return Device(
        device_id=device_id,
        enrolled_with=token,
        tags=list(token.tags),
        status=DeviceStatus.ACTIVE if token.auto_approve else DeviceStatus.PENDING,
        status_changed_at=timezone.now(),
    )


def device_enroll(
    *,
    device_id: str,
    enrollment_token: str | None = None,
    enrollment_code: str | None = None,
    identity: dict[str, Any] | None = None,
) -> Credentials:
    """Enroll a device with a fleet enrollment token or its pre-authorization code.

    Answers the device's API token and broker credentials. With an auto-approve token the
    device is active at once; otherwise its broker login stays disabled until an operator
    approves it. Trusted signing keys are not part of the answer: devices get them out of
    band (their configuration), so a rogue control plane cannot hand out its own.

    The broker client is made inside the transaction, with the device's row locked (or
    not yet visible): an approve, disable or retire racing with it waits, so the broker
    ends up as the database says; if the broker refuses, nothing is kept.
    """
    _check_device_id(device_id)
    if bool(enrollment_token) == bool(enrollment_code):
        raise InvalidInput(
            "Send exactly one of enrollment_token and enrollment_code.", code="invalid_enrollment"
        )
    # The use is counted by itself (so that devices enrolling with one token never wait
    # for each other's broker round trips) and given back if the enrollment fails.
    identity_fields = _identity(identity or {})
    token = _claim_enrollment_token(enrollment_token) if enrollment_token else None
    try:
        with transaction.atomic():
            device = (
                _device_by_code(device_id, enrollment_code)
                if token is None
                else _new_device(device_id, token)
            )
            for key, value in identity_fields.items():
                setattr(device, key, value)
            device.enrolled_at = timezone.now()
            try:
                with transaction.atomic():
                    device.save()
            except IntegrityError as exc:  # another enrollment of the same id won the race
                raise Conflict(
                    f"Device {device_id!r} is already enrolled.", code="already_enrolled", field="device_id"
                ) from exc
            credentials = _issue_credentials(device)
            _broker(
                broker.device_credentials_set,
                device_id=device.device_id,
                password=credentials.mqtt_password,
                enabled=device.status == DeviceStatus.ACTIVE,
            )
    except BaseException:
        if token is not None:
            _release_enrollment_token(token)
        raise
    return credentials


# --- bulk provisioning (for factories)


@dataclass(frozen=True)
class ProvisionItem:
    """One device of a bulk request: its id, its identity (the enrollment identity's
    fields: hardware, supports_int8, supported_ops, ...) and tags of its own."""

    device_id: str
    identity: dict[str, Any]
    tags: list[str]


def devices_provision_count_check(*, count: int) -> None:
    """At least one device, at most DEVICE_PROVISION_MAX_DEVICES: one answer holds every
    device's secrets, and one request holds the broker's admin connection."""
    cap = settings.DEVICE_PROVISION_MAX_DEVICES
    if count < 1:
        raise InvalidInput("Send at least one device.", code="invalid", field="devices")
    if count > cap:
        raise InvalidInput(
            f"At most {cap} devices per request (DEVICE_PROVISION_MAX_DEVICES); send several requests.",
            code=DeviceErrorCode.TOO_MANY_DEVICES,
            field="devices",
        )


def _provision_checked(items: list[ProvisionItem], tags: Any) -> list[tuple[str, dict[str, Any], list[str]]]:
    """Every refusal before anything is written: the cap, each id, repeated ids, each
    identity and each tag list (checked as enrollment tokens' tags are)."""
    devices_provision_count_check(count=len(items))
    common = _enrollment_token_check(tags=tags or []) or []
    checked, seen = [], set()
    for index, item in enumerate(items):
        where = f"devices.{index}"
        try:
            _check_device_id(item.device_id)
            identity = _identity(item.identity)
            own = _enrollment_token_check(tags=item.tags or []) or []
        except InvalidInput as exc:
            raise InvalidInput(exc.message, code=exc.code, field=f"{where}.{exc.field}") from exc
        if item.device_id in seen:
            raise InvalidInput(
                f"{item.device_id!r} is in the request twice.",
                code="duplicate_device",
                field=f"{where}.device_id",
            )
        seen.add(item.device_id)
        checked.append((item.device_id, identity, list(dict.fromkeys([*common, *own]))))
    return checked


def devices_provision(*, items: list[ProvisionItem], tags: list[str] | None = None) -> list[Credentials]:
    """Create many devices at once, active, with their credentials: a factory's batch.

    What ``device_enroll`` does for one device with an auto-approving token, for up to
    DEVICE_PROVISION_MAX_DEVICES at once: the rows and their API tokens in a few
    statements, and every broker client and role in a few control messages over one
    connection (``DynSec.devices_create``) instead of several connections per device. All or
    nothing: an id that exists (``already_enrolled``, ``device_retired``), is reserved, or
    names a broker account that is not a device's refuses the whole request, and if the
    broker refuses, nothing is kept. The secrets are in the answer only, once."""
    checked = _provision_checked(items, tags)
    ids = [device_id for device_id, _, _ in checked]
    now = timezone.now()
    with transaction.atomic():
        existing = Device.objects.filter(device_id__in=ids).order_by("device_id").first()
        if existing is not None:
            _refuse_existing(
                existing, code="already_enrolled", message=f"Device {existing.device_id!r} already exists."
            )
        devices = [
            Device(
                device_id=device_id,
                status=DeviceStatus.ACTIVE,
                status_changed_at=now,
                enrolled_at=now,
                tags=device_tags,
                **identity,
            )
            for device_id, identity, device_tags in checked
        ]
        try:
            with transaction.atomic():
                Device.objects.bulk_create(devices, batch_size=1000)
        except IntegrityError as exc:  # another request created one of them meanwhile
            raise Conflict(
                "One of these devices was created meanwhile; send the request again.",
                code="already_enrolled",
                field="devices",
            ) from exc
        keys = [_secret(DEVICE_TOKEN_PREFIX) for _ in devices]
        DeviceToken.objects.bulk_create(
            [
                DeviceToken(device=device, prefix=key[:10], key_sha256=sha256(key))
                for device, key in zip(devices, keys, strict=True)
            ],
            batch_size=1000,
        )
        passwords = {device.device_id: secrets.token_urlsafe(24) for device in devices}
        _broker(broker.devices_credentials_create, passwords=passwords)
    log.info("provisioned %d devices in bulk (%s … %s)", len(devices), ids[0], ids[-1])
    return [
        Credentials(device, key, device.device_id, passwords[device.device_id])
        for device, key in zip(devices, keys, strict=True)
    ]


# --- lifecycle


def _transition(device: Device, status: str) -> Device:
    allowed = DEVICE_TRANSITIONS[device.status]
    if status not in allowed:
        raise Conflict(
            f"{device} is {device.status}; it cannot become {status}"
            + (f" (allowed: {', '.join(allowed)})." if allowed else " (retired is final)."),
            code="illegal_transition",
        )
    updated = Device.objects.filter(pk=device.pk, status=device.status).update(
        status=status, status_changed_at=timezone.now()
    )
    if not updated:
        raise Conflict(f"{device} changed meanwhile; reload and try again.", code="concurrent_change")
    device.refresh_from_db()
    return device


def device_approve(*, device: Device) -> Device:
    device = _transition(device, DeviceStatus.ACTIVE)
    _broker(broker.device_credentials_enable, device_id=device.device_id)
    return device


def device_disable(*, device: Device) -> Device:
    """Revoke the device's token and broker login, and disconnect it now. A pre-authorized
    device that never enrolled has no broker login: there is nothing to disable there."""
    device = _transition(device, DeviceStatus.DISABLED)
    DeviceToken.objects.filter(device=device, revoked_at=None).update(revoked_at=timezone.now())
    Device.objects.filter(pk=device.pk).update(online=False)
    _broker(broker.device_credentials_disable, device_id=device.device_id)
    device.refresh_from_db()
    return device


def device_retire(*, device: Device) -> Device:
    """Final: the token is revoked, the one-time code forgotten (it can no longer enroll),
    the broker client deleted. The row stays, so that the id is never enrolled again."""
    device = _transition(device, DeviceStatus.RETIRED)
    DeviceToken.objects.filter(device=device, revoked_at=None).update(revoked_at=timezone.now())
    Device.objects.filter(pk=device.pk).update(online=False, enrollment_code_sha256="")
    try:
        broker.device_credentials_delete(device_id=device.device_id)
    except (BrokerError, OSError):
        log.warning("could not delete broker client %s; it stays disabled", device.device_id)
        _broker(broker.device_credentials_disable, device_id=device.device_id)
    device.refresh_from_db()
    return device


def device_rotate_credentials(*, device: Device) -> Credentials:
    """New API token and broker password (old ones stop working; the device is
    disconnected and must reconnect with the new password). The broker client's password
    changes in place; if the broker refuses, the old token stays valid."""
    with transaction.atomic():
        device = Device.objects.select_for_update().get(pk=device.pk)
        if device.status in (DeviceStatus.DISABLED, DeviceStatus.RETIRED):
            raise Conflict(f"{device} is {device.status}; approve it first.", code="illegal_transition")
        credentials = _issue_credentials(device)
        _broker(
            broker.device_credentials_set,
            device_id=device.device_id,
            password=credentials.mqtt_password,
            enabled=device.status == DeviceStatus.ACTIVE,
        )
    return credentials


def device_update(
    *, device: Device, display_name: str | None = None, tags: list[str] | None = None
) -> Device:
    if display_name is not None:
        device.display_name = display_name
    if tags is not None:
        device.tags = sorted({str(tag)[:64] for tag in tags})
    device.save(update_fields=["display_name", "tags"])
    return device


def device_get(*, device_id: str) -> Device:
    device = Device.objects.filter(device_id=device_id).first()
    if device is None:
        raise NotFound(f"No device {device_id!r}.", code="unknown_device")
    return device


# --- groups


@transaction.atomic
def group_create(
    *,
    name: str,
    kind: str = GroupKind.STATIC,
    description: str = "",
    members: list[Device] | None = None,
    rules: dict[str, Any] | None = None,
) -> DeviceGroup:
    """A static group (chosen members) or a dynamic one (a saved filter, checked here)."""
    validate_group_rules(rules or {})
    group = DeviceGroup.objects.create(name=name, kind=kind, description=description, rules=rules or {})
    group.members.set(members or [])
    return group


@transaction.atomic
def group_update(
    *,
    group: DeviceGroup,
    name: str | None = None,
    kind: str | None = None,
    description: str | None = None,
    members: list[Device] | None = None,
    rules: dict[str, Any] | None = None,
) -> DeviceGroup:
    """Change what is given (None leaves a field as it is); the rules are checked first."""
    if rules is not None:
        validate_group_rules(rules)
        group.rules = rules
    for field, value in (("name", name), ("kind", kind), ("description", description)):
        if value is not None:
            setattr(group, field, value)
    group.save()
    if members is not None:
        group.members.set(members)
    return group


# --- assignment: what a device should run


def devices_assign(
    *,
    devices: list[Device] | list[int],
    artifacts: dict[str, Any],
    rollout: dict | None = None,
    publish: str = "celery",
    shadows: dict[str, tuple[Any, float]] | None = None,
    clear_shadows: tuple[str, ...] = (),
) -> list[tuple[str, int]]:
    """Give each device a new, higher desired generation naming ``artifacts`` (model name ->
    ready Artifact) besides the models it already has. Returns (device id, generation).

    ``shadows`` (model name -> (ready Artifact, sample rate)) asks devices to run a candidate
    beside their live model without serving it (docs/protocol.md, addition 5); a new live
    artifact for a model, or ``clear_shadows``, ends that model's shadow.

    Everything that could refuse happens here, inside the transaction: inactive devices,
    artifacts that are not ready, revoked versions, a shadow without a live model beside it,
    a payload that breaks the contract (the first one is signed and checked). Once it
    commits, the desired states are signed and published retained: by chunked Celery tasks
    (``publish="celery"``: workers sign and publish in parallel) or right here
    (``publish="now"``, for a command that should report a broker error). The generation
    only grows, so an agent never mistakes a new command for a replay, and a model rollback
    is simply a newer generation naming the older version.
    """
    shadows = shadows or {}
    ids = sorted({getattr(device, "pk", device) for device in devices})  # Devices or their pks
    cleared = sorted({*artifacts, *clear_shadows})
    with transaction.atomic():
        devices_locked(Device.objects.filter(any_of("pk", ids)))  # in id order, as the bridge
        # One statement for any number of devices: the generation grows in the database
        # itself, and the new models are merged over the ones each device already has.
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE devices_device SET desired_generation = desired_generation + 1,"
                " desired_artifacts = desired_artifacts || %s::jsonb,"
                " desired_shadows = (desired_shadows - %s::text[]) || %s::jsonb"
                " WHERE id = ANY(%s) AND status = %s"
                " RETURNING device_id, desired_generation, desired_artifacts, desired_shadows,"
                " reported_models",
                [
                    json.dumps({name: a.pk for name, a in artifacts.items()}),
                    cleared,
                    json.dumps(
                        {name: {"artifact": a.pk, "sample_rate": rate} for name, (a, rate) in shadows.items()}
                    ),
                    ids,
                    DeviceStatus.ACTIVE,
                ],
            )
            rows = cursor.fetchall()
        if len(rows) != len(ids):
            inactive = Device.objects.filter(pk__in=ids).exclude(status=DeviceStatus.ACTIVE).first()
            raise Conflict(
                f"{inactive} is {inactive.status if inactive else 'gone'}; only active devices get models.",
                code="device_not_active",
            )
        states = [
            (device_id, generation, json_dict(wanted), json_dict(shadowed), json_dict(reported))
            for device_id, generation, wanted, shadowed, reported in rows
        ]
        for device_id, _, wanted, shadowed, _ in states:
            alone = sorted(set(shadowed) - set(wanted))
            if alone:
                raise Conflict(
                    f"{device_id} runs no {', '.join(alone)} to run a shadow beside.", code="no_live_model"
                )
        entries = desired_entries(states)
        desired_states_check(states=states, entries=entries, rollout=rollout)  # refuses a bad shape
        transaction.on_commit(lambda: desired_publish(states, entries, rollout, now=publish == "now"))
    return [(device_id, generation) for device_id, generation, *_ in states]
