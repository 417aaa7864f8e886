"""Secret redaction (`vmetal.server.redact`): what counts as a secret, and that it never reaches printed text.

Every test passes its environment explicitly; none reads or changes `os.environ`.
"""

from __future__ import annotations

import json

import pytest

from vmetal.server.redact import MASK, is_secret_name, mask, secret_values, url_without_credentials


@pytest.mark.parametrize("name", [
    "HF_TOKEN", "hf_token", "HUGGING_FACE_HUB_TOKEN", "VLLM_API_KEY", "MODELSCOPE_API_TOKEN", "OPENAI_API_KEY",
    "GITHUB_TOKEN", "ANTHROPIC_API_KEY", "AWS_SECRET_ACCESS_KEY", "CLIENT_SECRET", "DB_PASSWORD", "PGPASSWORD",
    "SMTP_PASSWD", "GOOGLE_APPLICATION_CREDENTIALS", "ALLOWED_KEYS", "MySecretThing",
])
def test_credential_like_names_are_secret(name):
    """Known token variables, any case, and names ending like or containing a credential word are secret."""
    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    "TOKENIZERS_PARALLELISM", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "PATH", "MONKEY", "KEYBOARD_LAYOUT",
    "VLLM_METAL_MEMORY_FRACTION", "MAX_TOKENS", "TOKEN_COUNT", "HTTPS_PROXY",
])
def test_ordinary_names_are_not_secret(name):
    """Names that merely contain TOKEN or KEY somewhere (TOKENIZERS_PARALLELISM, MONKEY) stay visible:
    masking their values would garble `doctor`'s report."""
    assert not is_secret_name(name)


def test_values_of_secret_variables_are_collected_longest_first():
    """A secret that contains another is listed before it, so `mask` hides it whole rather than leaving
    its tail visible around the shorter one's mask."""
    env = {"HF_TOKEN": "hf_abcdef", "MY_API_KEY": "hf_abcdef_and_more", "HF_HOME": "/home/me/hf"}
    values = secret_values(env)
    assert values == ["hf_abcdef_and_more", "hf_abcdef"]
    assert mask("key=hf_abcdef_and_more", values) == f"key={MASK}"


def test_short_and_boolean_values_are_not_secrets():
    """Switch-like values (`1`, `true`, `none`) and values shorter than 4 characters, after stripping, are
    not collected: masking `true` everywhere would mangle unrelated output."""
    env = {"USE_TOKEN": "true", "A_KEY": "False", "B_KEY": "NONE", "C_KEY": "null", "D_KEY": "unset",
           "E_KEY": "1", "F_KEY": "abc", "G_KEY": "  ab  ", "H_KEY": "", "I_KEY": "abcd"}
    assert secret_values(env) == ["abcd"]


def test_multiline_secret_values_are_split_into_lines():
    """A multi-line credential (a key file pasted into a variable) is masked line by line, so each line is
    hidden wherever it is printed; blank lines are dropped."""
    env = {"SERVICE_CREDENTIALS": "first-line-secret\nsecond-line-secret\n\n"}
    values = secret_values(env)
    assert set(values) == {"first-line-secret", "second-line-secret"}
    assert mask("got second-line-secret", values) == f"got {MASK}"


def test_url_credentials_anywhere_in_the_environment_are_secrets():
    """user:password in a URL is a secret whatever the variable is called (HF_ENDPOINT, HTTPS_PROXY), the
    pair and the password alone; URLs without a password are not."""
    env = {"HTTPS_PROXY": "http://alice:s3cret-pw@proxy.local:3128", "HF_ENDPOINT": "https://hub.example/path",
           "NO_PROXY": "localhost"}
    values = secret_values(env)
    assert values == ["alice:s3cret-pw", "s3cret-pw"]
    text = "proxy http://alice:s3cret-pw@proxy.local:3128 failed; password s3cret-pw"
    assert mask(text, values) == f"proxy http://{MASK}@proxy.local:3128 failed; password {MASK}"


def test_short_url_password_masks_only_the_pair():
    """A password under 4 characters is not masked on its own (it would hit ordinary words), but the
    user:password pair still is."""
    env = {"HTTPS_PROXY": "http://bob:pw@proxy.local"}
    assert secret_values(env) == ["bob:pw"]


def test_at_sign_in_a_url_path_is_not_a_credential():
    """An `@` after the host (`/users/a:b@c`) is part of the path, not userinfo: nothing is collected."""
    env = {"HF_ENDPOINT": "https://hub.example/users/a:bcdef@ghi"}
    assert secret_values(env) == []


def test_keys_handed_over_explicitly_are_masked():
    """`--api-key` values are passed as `extra`; empty or shorter-than-4 ones are ignored."""
    values = secret_values({}, extra=["sk-local-key", "", "abc"])
    assert values == ["sk-local-key"]
    assert mask("Authorization: Bearer sk-local-key", values) == f"Authorization: Bearer {MASK}"


def test_mask_hides_every_occurrence_inside_longer_text():
    """Masking works inside words and lines and replaces each occurrence, not just the first."""
    text = "a=tok123456;b=xtok123456x\ntok123456"
    assert mask(text, ["tok123456"]) == f"a={MASK};b=x{MASK}x\n{MASK}"


def test_mask_hides_the_json_escaped_form():
    """A secret containing a quote or a backslash is also hidden where it is printed JSON-encoded (a
    request body, `--format json` output)."""
    secret = 'pa"ss\\word'
    text = json.dumps({"token": secret})
    assert secret not in text  # the escaped form differs from the raw one
    assert mask(text, [secret]) == json.dumps({"token": "@"}).replace("@", MASK)


def test_mask_leaves_text_without_secrets_unchanged():
    assert mask("nothing to hide here", ["sk-local-key"]) == "nothing to hide here"
    assert mask("nothing to hide here", []) == "nothing to hide here"


@pytest.mark.parametrize(("url", "shown"), [
    ("https://alice:pw@hub.example:8443/api/models", f"https://{MASK}@hub.example:8443/api/models"),
    ("https://token@hub.example", f"https://{MASK}@hub.example"),
    ("http://us@er:p@ss@proxy.local/", f"http://{MASK}@proxy.local/"),
    ("https://hub.example/users/a@b", "https://hub.example/users/a@b"),
    ("https://hub.example", "https://hub.example"),
    ("alice:pw@hub.example", "alice:pw@hub.example"),
    ("", ""),
])
def test_url_without_credentials(url, shown):
    """The userinfo (everything up to the host's last `@`) is replaced, host, port and path kept; URLs with
    no userinfo, an `@` only in the path, or no scheme are returned as they are."""
    assert url_without_credentials(url) == shown


@pytest.mark.parametrize("value", ["hf_secret123\r\n", " hf_secret123 "])
def test_secret_with_surrounding_whitespace_is_still_masked(value):
    """A token read from a CRLF `.env` file or pasted with spaces is printed without them (a log line, a
    header); it must be masked there too."""
    assert mask("token hf_secret123.", secret_values({"HF_TOKEN": value})) == f"token {MASK}."


def test_at_sign_in_a_query_string_keeps_the_host():
    """`https://hub.example?next=a@b` has no credentials: it is shown as it is."""
    assert url_without_credentials("https://hub.example?next=a@b") == "https://hub.example?next=a@b"


def test_a_token_given_as_the_url_user_is_masked():
    """`https://TOKEN@host` (how GitHub-style tokens go into URLs) carries a credential with no password;
    `url_without_credentials` hides it in display, and `secret_values` must too, wherever it is printed."""
    secrets = secret_values({"HF_ENDPOINT": "https://ghp_abcdef1234@hub.example/path"})
    assert mask("pulling from ghp_abcdef1234", secrets) == f"pulling from {MASK}"
    assert url_without_credentials("https://ghp_abcdef1234@hub.example/p") == f"https://{MASK}@hub.example/p"
