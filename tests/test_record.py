import json

import pytest

from bridge.errors import RecordError, RecordExpiredError, RecordSignatureError
from bridge.record import make_record, parse_record, verify_record

TOKEN = "t" * 43


def _record(**kw):
    args = {"token": TOKEN, "instance": "inst-1", "mlflow_version": "3.17.2", "ttl_s": 60, "now": 1_000_000.0}
    args.update(kw)
    return make_record("https://abc.ngrok-free.app/", **args)


def test_round_trip_verifies_and_never_contains_the_token():
    text = _record().to_json()
    assert TOKEN not in text
    rec = verify_record(text, TOKEN, now=1_000_030.0)
    assert rec.url == "https://abc.ngrok-free.app"
    assert json.loads(text)["url"] == "https://abc.ngrok-free.app"


def test_other_token_is_rejected_as_bad_signature():
    with pytest.raises(RecordSignatureError, match="signature"):
        verify_record(_record().to_json(), "other-token", now=1_000_030.0)


def test_altered_url_is_rejected():
    data = json.loads(_record().to_json())
    data["url"] = "https://evil.example"
    with pytest.raises(RecordSignatureError):
        verify_record(json.dumps(data), TOKEN, now=1_000_030.0)


def test_expired_record_names_the_url_and_age():
    with pytest.raises(RecordExpiredError, match=r"abc\.ngrok-free\.app expired 40 s ago"):
        verify_record(_record().to_json(), TOKEN, now=1_000_100.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "not valid JSON"),
        (b"\xff\xfe\xfd", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"url": "x"}', "lacks issued_at"),
    ],
)
def test_malformed_records_say_what_is_wrong(text, message):
    with pytest.raises(RecordError, match=message):
        parse_record(text)


def test_url_with_credentials_is_refused():
    with pytest.raises(RecordError, match="credentials"):
        make_record("https://u:p@x.example", token=TOKEN, instance="i", mlflow_version="v", ttl_s=5)


def test_freshness_refuses_an_older_record_of_the_same_instance():
    from bridge.record import RecordFreshness

    seen = RecordFreshness()
    old = _record(now=1_000_000.0)
    new = make_record(
        "https://new.ngrok-free.app",
        token=TOKEN,
        instance="inst-1",
        mlflow_version="3.17.2",
        ttl_s=600,
        now=1_000_100.0,
    )
    assert seen.check(verify_record(old.to_json(), TOKEN, now=1_000_030.0)) == old
    seen.check(new)
    seen.check(new)  # the same record again (a re-read of an unchanged file) is fine
    # A replay of the older, still-valid record (e.g. put back on a world-writable ntfy topic) is refused.
    with pytest.raises(RecordError, match="older record"):
        seen.check(old)
    # Another instance (bridge serve restarted) has its own history.
    other = make_record(
        "https://other.ngrok-free.app", token=TOKEN, instance="inst-2", mlflow_version="3.17.2", ttl_s=60, now=999_000.0
    )
    assert seen.check(other) == other


def test_check_http_url_is_the_one_url_rule():
    from bridge.errors import ConfigError
    from bridge.record import LOOPBACK_HOSTS, check_http_url

    assert "127.0.0.1" in LOOPBACK_HOSTS
    assert check_http_url("https://api.github.com") == "https://api.github.com"
    assert check_http_url("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080/x"
    assert check_http_url("http://100.64.1.2:5001", allow_plain_http_loopback_only=False)
    with pytest.raises(ConfigError, match=r"only to 127.0.0.1"):
        check_http_url("http://100.64.1.2:5001", what="BRIDGE_GITHUB_API")
    with pytest.raises(ConfigError, match="credentials") as info:
        check_http_url("https://u:hunter2pass@x.example/")
    assert "hunter2pass" not in str(info.value)
    with pytest.raises(ConfigError, match="not an http") as info:
        check_http_url("ftp://x.example/?auth=tk_secret")
    assert "tk_secret" not in str(info.value)
