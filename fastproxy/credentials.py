# google-auth's functions carry no annotations, so strict mypy flags every call into it; the
# calls are allowed for this module only, and our own code stays fully typed.
# mypy: disallow-untyped-calls=False
"""Where fastproxy's Google credentials come from, mirroring the AlloyDB Auth Proxy's flags.

Two credentials come out of :func:`build_credentials` (protocol.md §2.5):

* ``api`` — scope ``cloud-platform``, for the Admin API calls;
* ``login`` — scope ``alloydb.login``, whose access token goes into the metadata exchange (IAM
  database login and the ``alloydb.instances.connect`` check).

Sources, in the Auth Proxy's order of precedence (its ``internal/proxy/proxy.go``):

=========================== ====================================================================
``--token``                 a static bearer token (cannot be refreshed); also the login token,
                            unless ``--login-token`` is given and auto IAM authn is on
``--credentials-file``      a key file (service account, authorized user, external account ...)
``--json-credentials``      the same, inline JSON
``--gcloud-auth``           ``gcloud config config-helper`` (legacy; ADC is preferred)
(none)                      Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``,
                            gcloud's ADC file, the metadata server)
=========================== ====================================================================

``--impersonate-service-account TARGET[,DELEGATE...]`` wraps whichever source is selected: the
first account is the target, the following ones form the delegation chain, the *last* being
impersonated directly by the source principal (``sa1,sa2,sa3``: the caller impersonates sa3, which
impersonates sa2, which impersonates the target sa1). google-auth wants the delegates in the order
the chain is walked from the caller, so they are passed reversed: ``[sa3, sa2]``.

Everything is google-auth; no token endpoint is hand-rolled. Tokens are never logged and never
put in an error message; neither is inline JSON (it may hold a private key).

:func:`token_for` is how the refresher thread gets an access token for the metadata exchange;
it may do network I/O (a token refresh), so it never runs on the event loop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.auth.impersonated_credentials
import google.auth.transport
import google.auth.transport.requests
import google.oauth2.credentials

from fastproxy.errors import ConfigError, FastproxyError

__all__ = [
    "CLOUD_PLATFORM_SCOPE",
    "LOGIN_SCOPE",
    "CredentialOptions",
    "CredentialSet",
    "GcloudCredentials",
    "TokenError",
    "build_credentials",
    "notices",
    "parse_impersonation_chain",
    "token_for",
    "validate",
]

CLOUD_PLATFORM_SCOPE: Final = "https://www.googleapis.com/auth/cloud-platform"
LOGIN_SCOPE: Final = "https://www.googleapis.com/auth/alloydb.login"
#: gcloud starts a Python interpreter and may refresh its own token over the network.
GCLOUD_TIMEOUT_S: Final = 60.0
#: Ask gcloud for a token valid this long, so it is not handed out minutes before expiry
#: (the Auth Proxy asks for one hour too).
GCLOUD_MIN_EXPIRY: Final = "1h"
#: Impersonated tokens are requested for the IAM Credentials API's default, one hour.
IMPERSONATION_LIFETIME_S: Final = 3600


class TokenError(FastproxyError):
    """An access token could not be obtained (refresh failed). The message never holds a token."""


@dataclass(frozen=True)
class CredentialOptions:
    """The credential-related flags, as given (``None``/empty means "not given").

    ``auto_iam_authn`` must be true if automatic IAM database authentication is enabled globally
    *or for any instance*: it decides whether ``--login-token`` is used.
    ``impersonate_service_account`` is ``"target[,delegate1,...]"`` as the Auth Proxy takes it.
    """

    token: str | None = None
    login_token: str | None = None
    credentials_file: str | None = None
    json_credentials: str | None = None
    impersonate_service_account: str | None = None
    gcloud_auth: bool = False
    auto_iam_authn: bool = False
    quota_project: str | None = None

    def __repr__(self) -> str:
        # Tokens and inline JSON are secrets: show only which options are set.
        shown = {
            "token": "<set>" if self.token else None,
            "login_token": "<set>" if self.login_token else None,
            "credentials_file": self.credentials_file,
            "json_credentials": "<set>" if self.json_credentials else None,
            "impersonate_service_account": self.impersonate_service_account,
            "gcloud_auth": self.gcloud_auth,
            "auto_iam_authn": self.auto_iam_authn,
            "quota_project": self.quota_project,
        }
        inner = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"CredentialOptions({inner})"


@dataclass(frozen=True)
class CredentialSet:
    """``api`` for the Admin API (cloud-platform), ``login`` for the metadata exchange token
    (alloydb.login). They may be the same object (a static ``--token``, gcloud, user ADC)."""

    api: google.auth.credentials.Credentials
    login: google.auth.credentials.Credentials


def validate(opts: CredentialOptions) -> None:
    """Reject the flag combinations the AlloyDB Auth Proxy rejects, with its messages.

    Source: ``cmd/root.go`` ``parseConfig`` of alloydb-auth-proxy 1.15.2 (at most one of
    ``--token``, ``--credentials-file``, ``--json-credentials``, ``--gcloud-auth``). That
    version does *not* reject ``--login-token`` without ``--token`` or without
    ``--auto-iam-authn``: it ignores the login token when auto IAM authn is off (see
    :func:`notices`), and combines it with any API credential source. Impersonation combines
    with every source. Beyond the Auth Proxy we reject a malformed impersonation chain here
    rather than at the first token request.
    """
    token = bool(opts.token)
    cred_file = bool(opts.credentials_file)
    cred_json = bool(opts.json_credentials)
    gcloud = opts.gcloud_auth
    pairs = (
        (token and cred_file, "--token and --credentials-file"),
        (token and gcloud, "--token and --gcloud-auth"),
        (cred_file and gcloud, "--credentials-file and --gcloud-auth"),
        (cred_json and token, "--json-credentials and --token"),
        (cred_json and cred_file, "--json-credentials and --credentials-file"),
        (cred_json and gcloud, "--json-credentials and --gcloud-auth"),
    )
    for clash, names in pairs:
        if clash:
            raise ConfigError(f"cannot specify {names} flags at the same time")
    if opts.impersonate_service_account is not None:
        parse_impersonation_chain(opts.impersonate_service_account)


def notices(opts: CredentialOptions) -> list[str]:
    """Informational lines the caller should log (the Auth Proxy logs the same at start-up)."""
    out: list[str] = []
    if opts.login_token and not opts.auto_iam_authn:
        out.append(
            "Ignoring --login-token because --auto-iam-authn is not enabled "
            "(globally or per-instance)"
        )
    return out


def parse_impersonation_chain(chain: str) -> tuple[str, list[str]]:
    """Split ``"target,d1,d2"`` into the target and google-auth's delegate order ``[d2, d1]``.

    The Auth Proxy's documented semantics: the first account is the target; each following one
    is a delegate of the one before it, so the caller's principal impersonates the *last* one.
    google-auth's ``delegates`` list starts from the account the caller impersonates first.
    """
    accounts = [a.strip() for a in chain.split(",")]
    if not accounts or any(not a for a in accounts):
        raise ConfigError(
            f"invalid --impersonate-service-account {chain!r}: expected a comma-separated "
            "list of service account e-mails, target first"
        )
    return accounts[0], list(reversed(accounts[1:]))


def _rescoped(
    creds: google.auth.credentials.Credentials, scopes: Sequence[str]
) -> google.auth.credentials.Credentials:
    """A copy of ``creds`` with ``scopes`` if the credential type takes scopes, else ``creds``.

    Not ``with_scopes_if_required``: that keeps the cloud-platform scope already set on a
    service account instead of switching to the login scope. Types that cannot be scoped (user
    refresh tokens, static tokens) carry whatever scopes they were granted, as in the connectors.
    """
    if isinstance(creds, google.auth.credentials.Scoped):
        scoped: google.auth.credentials.Credentials = creds.with_scopes(list(scopes))
        return scoped
    return creds


def _with_quota_project(
    creds: google.auth.credentials.Credentials, quota_project: str | None
) -> google.auth.credentials.Credentials:
    if quota_project and isinstance(
        creds, google.auth.credentials.CredentialsWithQuotaProject
    ):
        with_project: google.auth.credentials.Credentials = creds.with_quota_project(quota_project)
        return with_project
    return creds


@contextlib.contextmanager
def _operator_supplied() -> Iterator[None]:
    """Silence google-auth's deprecation warning on its generic loaders, for our two uses only.

    google-auth deprecates ``load_credentials_from_file``/``_dict`` because loading a credential
    configuration from an *untrusted* source can run arbitrary executables (external accounts).
    Here the file or JSON is named by the operator on the command line, exactly as trusted as
    ``GOOGLE_APPLICATION_CREDENTIALS``, which ``google.auth.default`` loads with the same generic
    loader; and the Auth Proxy accepts every credential type there too. Only called at start-up
    (``catch_warnings`` is process-global).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning, message=r"The load_credentials_from_"
        )
        yield


def _load_info(info: dict[str, Any], what: str) -> google.auth.credentials.Credentials:
    creds: google.auth.credentials.Credentials
    try:
        with _operator_supplied():
            creds, _ = google.auth.load_credentials_from_dict(
                info, scopes=[CLOUD_PLATFORM_SCOPE]
            )
    except google.auth.exceptions.GoogleAuthError as exc:
        raise ConfigError(f"cannot use {what}: {_first_line(exc)}") from None
    return creds


def _source_credentials(opts: CredentialOptions) -> google.auth.credentials.Credentials:
    """The selected base credentials, cloud-platform scoped where scoping applies."""
    if opts.token:
        return google.oauth2.credentials.Credentials(opts.token)
    creds: google.auth.credentials.Credentials
    if opts.credentials_file:
        try:
            with _operator_supplied():
                creds, _ = google.auth.load_credentials_from_file(
                    opts.credentials_file, scopes=[CLOUD_PLATFORM_SCOPE]
                )
        except google.auth.exceptions.GoogleAuthError as exc:
            raise ConfigError(
                f"cannot use --credentials-file {opts.credentials_file!r}: {_first_line(exc)}"
            ) from None
        return creds
    if opts.json_credentials:
        try:
            info = json.loads(opts.json_credentials)
        except ValueError:
            # Never echo the JSON: it may hold a private key.
            raise ConfigError("--json-credentials is not valid JSON") from None
        if not isinstance(info, dict):
            raise ConfigError("--json-credentials must be a JSON object")
        return _load_info(info, "--json-credentials")
    if opts.gcloud_auth:
        gcloud = GcloudCredentials()
        try:
            gcloud.refresh(google.auth.transport.requests.Request())
        except google.auth.exceptions.RefreshError as exc:
            raise ConfigError(f"--gcloud-auth: {_first_line(exc)}") from None
        return gcloud
    try:
        creds, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ConfigError(
            "no credentials found: give --token, --credentials-file, --json-credentials or "
            "--gcloud-auth, or set up Application Default Credentials (gcloud auth "
            "application-default login, or GOOGLE_APPLICATION_CREDENTIALS) "
            f"({_first_line(exc)})"
        ) from None
    return creds


def build_credentials(opts: CredentialOptions) -> CredentialSet:
    """Build the API and login credentials for ``opts`` (validated first).

    May run gcloud or probe the metadata server (ADC), so it runs at start-up, off the loop.
    Raises ``ConfigError`` for a bad file, bad JSON, no ADC or a failing gcloud. Tokens are not
    fetched here (except gcloud's, to fail early as the Auth Proxy does).
    """
    validate(opts)
    source = _source_credentials(opts)
    if opts.impersonate_service_account:
        target, delegates = parse_impersonation_chain(opts.impersonate_service_account)

        def impersonated(scope: str) -> google.auth.credentials.Credentials:
            return google.auth.impersonated_credentials.Credentials(
                source_credentials=source,
                target_principal=target,
                target_scopes=[scope],
                delegates=delegates or None,
                lifetime=IMPERSONATION_LIFETIME_S,
            )

        api = impersonated(CLOUD_PLATFORM_SCOPE)
        login = impersonated(LOGIN_SCOPE)
    else:
        api = source
        # A static token or gcloud's token is what it is; key files and ADC are re-scoped.
        login = source if (opts.token or opts.gcloud_auth) else _rescoped(source, [LOGIN_SCOPE])
    if opts.login_token and opts.auto_iam_authn:
        login = google.oauth2.credentials.Credentials(opts.login_token)
    api = _with_quota_project(api, opts.quota_project)
    return CredentialSet(api=api, login=login)


def token_for(
    credentials: google.auth.credentials.Credentials,
    request: google.auth.transport.Request | None = None,
) -> str:
    """A currently valid access token of ``credentials``, refreshing it first if needed.

    Runs on the refresher thread (a refresh is network I/O). A static token is returned as is.
    Raises :class:`TokenError`.
    """
    if not credentials.valid:
        try:
            credentials.refresh(request or google.auth.transport.requests.Request())
        except google.auth.exceptions.GoogleAuthError as exc:
            raise TokenError(f"could not obtain an access token: {_first_line(exc)}") from exc
    token = credentials.token
    if not isinstance(token, str) or not token:
        raise TokenError("could not obtain an access token: the credentials hold none")
    return token


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


class GcloudCredentials(google.auth.credentials.CredentialsWithQuotaProject):
    """Credentials that take gcloud's current user token (``--gcloud-auth``).

    ``refresh`` runs ``gcloud config config-helper --format=json --min-expiry=1h`` and reads
    ``credential.access_token`` and ``credential.token_expiry``. A legacy path (ADC is preferred),
    kept because the Auth Proxy has it. Failures raise google-auth's ``RefreshError`` so that
    callers treat them like any other refresh failure.
    """

    def __init__(
        self,
        gcloud: str | None = None,
        *,
        timeout: float = GCLOUD_TIMEOUT_S,
        quota_project_id: str | None = None,
    ) -> None:
        super().__init__()
        self._gcloud = gcloud
        self._timeout = timeout
        self._quota_project_id = quota_project_id

    def with_quota_project(self, quota_project_id: str | None) -> GcloudCredentials:
        return GcloudCredentials(
            self._gcloud, timeout=self._timeout, quota_project_id=quota_project_id
        )

    def refresh(self, request: google.auth.transport.Request) -> None:
        gcloud = self._gcloud or shutil.which("gcloud")
        if not gcloud:
            raise google.auth.exceptions.RefreshError(
                "gcloud was not found on PATH; install the Google Cloud CLI or use "
                "Application Default Credentials"
            )
        argv = [gcloud, "config", "config-helper", "--format=json",
                f"--min-expiry={GCLOUD_MIN_EXPIRY}"]
        try:
            proc = subprocess.run(
                argv, capture_output=True, timeout=self._timeout, check=False, text=True
            )
        except subprocess.TimeoutExpired:
            raise google.auth.exceptions.RefreshError(
                f"gcloud config config-helper did not finish within {self._timeout:g} s"
            ) from None
        except OSError as exc:
            raise google.auth.exceptions.RefreshError(
                f"cannot run {gcloud}: {exc.strerror or exc}"
            ) from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            detail = lines[-1] if lines else "no error output"
            raise google.auth.exceptions.RefreshError(
                f"gcloud config config-helper failed (exit status {proc.returncode}): {detail}"
            )
        token, expiry = self._parse(proc.stdout)
        self.token = token
        self.expiry = expiry

    @staticmethod
    def _parse(output: str) -> tuple[str, dt.datetime | None]:
        """(access token, naive-UTC expiry) from config-helper's JSON (google-auth's format)."""
        try:
            doc = json.loads(output)
        except ValueError:
            raise google.auth.exceptions.RefreshError(
                "gcloud config config-helper printed something that is not JSON"
            ) from None
        cred = doc.get("credential") if isinstance(doc, dict) else None
        token = cred.get("access_token") if isinstance(cred, dict) else None
        if not isinstance(token, str) or not token:
            raise google.auth.exceptions.RefreshError(
                "gcloud config config-helper returned no access token; "
                "run gcloud auth login"
            )
        assert isinstance(cred, dict)
        raw_expiry = cred.get("token_expiry")
        expiry: dt.datetime | None = None
        if isinstance(raw_expiry, str) and raw_expiry:
            try:
                parsed = dt.datetime.fromisoformat(raw_expiry)
            except ValueError:
                raise google.auth.exceptions.RefreshError(
                    f"gcloud returned an unreadable token_expiry {raw_expiry!r}"
                ) from None
            if parsed.tzinfo is not None:
                parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
            expiry = parsed  # google-auth compares naive UTC datetimes
        return token, expiry
