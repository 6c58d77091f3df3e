"""Settings from the environment: parsing, errors in one line, README table in sync."""

from __future__ import annotations

import pytest

from streams.settings import SETTINGS, Settings, SettingsError, settings_markdown
from tests.conftest import REPO


def test_defaults_and_prefix() -> None:
    settings = Settings.from_env({"PERSONA_TOPIC_PREFIX": "shop1."})
    assert settings.partitions == 8
    assert settings.topics["clickstream"] == "shop1.clickstream"
    assert settings.input_topics["email"] == "shop1.email-events"
    assert settings.consent_default == "deny"


def test_round_trip_through_environment() -> None:
    settings = Settings.from_env({"PERSONA_PARTITIONS": "3", "PERSONA_STORE": "rocksdb://"})
    assert Settings.from_env(settings.as_env()) == settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PERSONA_PARTITIONS": "zero"}, "PERSONA_PARTITIONS='zero'"),
        ({"PERSONA_PARTITIONS": "-2"}, "must be a positive integer"),
        ({"PERSONA_STORE": "redis://x"}, "memory:// or rocksdb://"),
        ({"PERSONA_CONSENT_DEFAULT": "maybe"}, "deny, allow"),
        ({"PERSONA_HEARTBEAT_S": "5", "PERSONA_SESSION_TIMEOUT_S": "2"}, "must be below"),
    ],
)
def test_bad_values_name_the_variable_in_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    assert settings_markdown() in readme, "regenerate with: persona settings --markdown"
    for setting in SETTINGS.values():
        assert setting.env in readme


def test_kafka_security_settings_reach_the_clients_and_faust() -> None:
    import asyncio
    import ssl

    import faust
    from aiokafka import AIOKafkaProducer

    from streams.app import broker_credentials

    settings = Settings.from_env(
        {
            "PERSONA_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "PERSONA_KAFKA_SASL_MECHANISM": "scram-sha-512",
            "PERSONA_KAFKA_SASL_USERNAME": "persona",
            "PERSONA_KAFKA_SASL_PASSWORD": "pw",
        }
    )
    options = settings.kafka_security.client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert isinstance(options["ssl_context"], ssl.SSLContext)

    async def construct() -> str:
        producer = AIOKafkaProducer(bootstrap_servers="kafka:9093", **options)  # not started
        return producer.client._security_protocol

    assert asyncio.run(construct()) == "SASL_SSL"
    credentials = broker_credentials(settings.kafka_security)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.username == "persona"
    plain = Settings.from_env({})
    assert plain.kafka_security.client_options() == {}
    assert broker_credentials(plain.kafka_security) is None
    with pytest.raises(SettingsError, match="PERSONA_KAFKA_SECURITY_PROTOCOL"):
        Settings.from_env({"PERSONA_KAFKA_SECURITY_PROTOCOL": "TLS"})
