"""Webhook URL policy (common/ssrf.py): every address class and spelling, with an injected resolver (no DNS)."""

from collections.abc import Sequence

import pytest

from app.errors import Problem
from app.generations import approve_webhook_url
from common import ssrf

STRICT = ssrf.Policy()
PUBLIC = "93.184.215.14"  # classified only: nothing is ever sent anywhere in this module


def no_dns(host: str, port: int) -> Sequence[str]:
    raise AssertionError(f"the resolver must not be called for {host!r}")


def fixed(*addresses: str) -> ssrf.Resolver:
    calls: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> Sequence[str]:
        calls.append((host, port))
        return list(addresses)

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def refused(url: str, policy: ssrf.Policy = STRICT, resolver: ssrf.Resolver = no_dns) -> str:
    with pytest.raises(ssrf.UnsafeUrl) as info:
        ssrf.check_url(url, policy, resolver)
    return str(info.value)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("[::1]", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("[fd00::1]", "private"),
        ("[fec0::1]", "private"),  # deprecated site-local, which Python does not call private
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("[fe80::1]", "link-local"),
        ("224.0.0.1", "multicast"),
        ("[ff0e::1]", "multicast"),  # global-scope multicast is still not a webhook receiver
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("[::]", "unspecified"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("198.18.0.1", "private"),  # benchmarking
        ("[2001:db8::1]", "private"),  # documentation
        ("[64:ff9b:1::1]", "reserved"),  # local-use NAT64 (inside ::/8)
    ],
)
def test_address_classes_are_refused(host: str, reason: str) -> None:
    msg = refused(f"https://{host}/hook")
    assert reason in msg


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",  # decimal
        "0x7f000001",  # hex
        "0X7F000001",  # hex, upper case
        "017700000001",  # octal
        "0177.0.0.1",  # octal part
        "0x7f.0.0.1",  # hex part
        "127.1",  # short form a.d
        "127.0.1",  # short form a.b.d
        "127.0.0.1.",  # trailing root dot
        "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
        "[::ffff:7f00:1]",  # the same, in hex
        "[2002:7f00:1::]",  # 6to4 around 127.0.0.1
        "[64:ff9b::7f00:1]",  # NAT64 around 127.0.0.1
        "[::127.0.0.1]",  # IPv4-compatible (deprecated)
    ],
)
def test_every_spelling_of_loopback_is_refused(host: str) -> None:
    msg = refused(f"https://{host}:8443/x")
    assert "loopback" in msg or "reserved" in msg, msg


@pytest.mark.parametrize(
    "host", ["2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518", "[::ffff:169.254.169.254]"]
)
def test_every_spelling_of_the_metadata_address_is_refused(host: str) -> None:
    assert "link-local" in refused(f"https://{host}/latest/meta-data")


@pytest.mark.parametrize("host", ["256.0.0.1", "1.2.3.4.5", "0x1g.0.0.1", "08.0.0.1", "1.2.3.99999999"])
def test_malformed_numeric_hosts_are_refused_not_resolved(host: str) -> None:
    refused(f"https://{host}/")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://hooks.example.com/x", "https"),
        ("ftp://hooks.example.com/x", "https"),
        ("file:///etc/passwd", "https"),
        ("gopher://127.0.0.1:6379/_INFO", "https"),
        ("//hooks.example.com/x", "https"),
        ("https://user:pw@hooks.example.com/x", "credentials"),
        ("https:///x", "host"),
        ("https://hooks%2eexample.com/", "ASCII"),
        ("https://[::1%25eth0]/", "loopback"),  # a zone id does not hide the address
        ("https://hooks.example.com:99999/", "port"),
    ],
)
def test_non_https_and_malformed_urls_are_refused(url: str, fragment: str) -> None:
    assert fragment in refused(url, resolver=fixed(PUBLIC))


def test_public_name_resolves_through_the_injected_resolver_and_is_pinned() -> None:
    resolver = fixed(PUBLIC, "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    checked = ssrf.check_url("https://Hooks.Example.com:8443/sdxl?x=1", STRICT, resolver)
    assert checked.address == PUBLIC and checked.host == "hooks.example.com" and checked.port == 8443
    assert resolver.calls == [("hooks.example.com", 8443)]  # type: ignore[attr-defined]


def test_public_literals_pass() -> None:
    assert ssrf.check_url(f"https://{PUBLIC}/", STRICT, no_dns).address == PUBLIC
    assert ssrf.check_url("https://[2606:4700::1111]/", STRICT, no_dns).address == "2606:4700::1111"


@pytest.mark.parametrize("answer", [["127.0.0.1"], ["10.0.0.7"], [PUBLIC, "192.168.0.1"], ["::ffff:10.0.0.1"]])
def test_a_name_resolving_to_any_internal_address_is_refused(answer: list[str]) -> None:
    msg = refused("https://rebind.example.com/", resolver=fixed(*answer))
    assert "rebind.example.com" in msg


def test_unresolvable_and_empty_answers_are_refused() -> None:
    def fails(host: str, port: int) -> Sequence[str]:
        raise OSError("Name or service not known")

    assert "could not be resolved" in refused("https://nxdomain.example/", resolver=fails)
    assert "no address" in refused("https://empty.example/", resolver=fixed())


def test_allowlist_is_exact_address_and_port() -> None:
    policy = ssrf.Policy.build(["127.0.0.1:8080", "10.0.0.5"], allow_http=False)
    assert ssrf.check_url("https://127.0.0.1:8080/h", policy, no_dns).address == "127.0.0.1"
    assert ssrf.check_url("https://[::ffff:127.0.0.1]:8080/h", policy, no_dns).address == "127.0.0.1"
    refused("https://127.0.0.1:8081/h", policy)  # another port on the same host
    refused("https://127.0.0.2:8080/h", policy)  # another loopback address
    assert ssrf.check_url("https://10.0.0.5:9999/h", policy, no_dns).address == "10.0.0.5"  # bare IP: any port
    assert ssrf.check_url("https://internal.example/h", policy, fixed("10.0.0.5")).address == "10.0.0.5"
    refused("https://internal.example/h", policy, fixed("10.0.0.5", "10.0.0.6"))


def test_allow_http_only_lifts_the_scheme_rule() -> None:
    policy = ssrf.Policy.build(["[::1]:9000"], allow_http=True)
    assert ssrf.check_url("http://[::1]:9000/h", policy, no_dns).address == "::1"
    assert "loopback" in refused("http://127.0.0.1:9000/h", policy)
    assert "https" in refused("ftp://[::1]:9000/h", policy)


@pytest.mark.parametrize("entry", ["localhost", "127.0.0.1:port", "300.1.1.1", ""])
def test_bad_allowlist_entries_fail_at_start(entry: str) -> None:
    with pytest.raises(ValueError):
        ssrf.Policy.build([entry], allow_http=False)


def test_split_list_accepts_commas_spaces_and_json() -> None:
    assert ssrf.split_list("127.0.0.1:1, [::1]:2 10.0.0.1") == ["127.0.0.1:1", "[::1]:2", "10.0.0.1"]
    assert ssrf.split_list('["a", "b"]') == ["a", "b"]
    assert ssrf.split_list("") == []


def test_approve_answers_a_422_problem_naming_the_field_and_value() -> None:
    url = "https://0x7f000001/hook"
    with pytest.raises(Problem) as info:
        approve_webhook_url(url, STRICT, no_dns)
    p = info.value
    assert p.status == 422 and p.errors is not None
    assert p.errors == [{"field": "webhook.url", "message": p.errors[0]["message"], "value": url}]
    assert "loopback" in p.detail and "`webhook.url`" in p.detail
    assert "SDXL_WEBHOOK_ALLOW_ADDRESSES" in p.detail  # the refusal names the setting that would allow the URL


def test_each_refusal_names_its_own_setting() -> None:
    with pytest.raises(Problem) as http:
        approve_webhook_url("http://example.com/hook", STRICT, no_dns)
    assert "set SDXL_WEBHOOK_ALLOW_HTTP=true" in http.value.detail
    with pytest.raises(ssrf.UnsafeUrl) as fetch:
        ssrf.check_url("https://10.0.0.5/x.png", STRICT, no_dns)
    assert "SDXL_IMAGE_FETCH_ALLOW_ADDRESSES" in fetch.value.hint("SDXL_IMAGE_FETCH_")
    with pytest.raises(ssrf.UnsafeUrl) as scheme:
        ssrf.check_url("ftp://example.com/x", STRICT, no_dns)
    assert scheme.value.hint("SDXL_WEBHOOK_") == str(scheme.value)  # no setting allows ftp: none is named


def test_recheck_at_delivery_uses_the_current_policy_without_dns() -> None:
    assert ssrf.recheck_address(PUBLIC, 443, STRICT) is None
    assert "loopback" in (ssrf.recheck_address("127.0.0.1", 8080, STRICT) or "")
    assert ssrf.recheck_address("127.0.0.1", 8080, ssrf.Policy.build(["127.0.0.1:8080"], False)) is None
    assert ssrf.recheck_address("not-an-ip", 443, STRICT) is not None
