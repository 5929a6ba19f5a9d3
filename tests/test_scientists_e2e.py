"""The scientists' email on the simulated facility: one email per recorded EPN, to the visit's people, never twice,
none in a dry run; names from the portal kept intact and escaped."""

from email import policy
from email.parser import BytesParser

from tests.test_mxsync import ENDED, mxsync, recorded


def _parsed(message):
    return BytesParser(policy=policy.default).parsebytes(message.raw)


def test_the_scientists_of_a_synced_epn_get_one_email_with_the_path_and_none_again(facility):
    facility.add_experiment(
        "mx",
        "12282a",
        equipment_id=23,
        principal=("Zoë", "Ångström", "zoe@uni.example.edu"),
        data_scientists=[("<b>Eve</b>", "O'Brien", "eve@uni.example.edu"), ("Beam", "Staff", "staff@facility.example")],
        **ENDED,
    )
    config = facility.write_config(notify_scientists=True, notify_scientists_exclude=["STAFF@facility.example"])

    mxsync("--config", config, "--once", check=0)  # a dry run emails nobody
    assert facility.smtp.messages == [] and recorded(config) == set()

    mxsync("--config", config, "--execute", "--once", check=0)
    facility.smtp.wait_for(1)
    mxsync("--config", config, "--execute", "--once", check=0)  # never twice
    (message,) = facility.smtp.messages
    assert sorted(message.rcpt_tos) == ["eve@uni.example.edu", "zoe@uni.example.edu"]
    email = _parsed(message)
    assert "12282a" in email["Subject"]
    assert "Zoë Ångström" in email["To"]
    text = email.get_body(("plain",)).get_content()
    html = email.get_body(("html",)).get_content()
    data = str(facility.destination / "ny79" / "12282a" / "data")
    assert data in text and data in html
    assert "Verified      yes" in text
    assert "Zoë Ångström" in text and "Zoë Ångström" in html
    assert "<b>Eve</b>" not in html and "&lt;b&gt;Eve&lt;/b&gt;" in html
    assert recorded(config) == {"12282a"}
