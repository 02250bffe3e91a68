"""An HTTP front on loopback that checks each request's Signature Version 4 as AWS does,
in front of ElasticMQ, which checks none (it takes any keys, and unsigned requests).
With it, a wrong secret or an unknown access key id is refused for real: the relay's
botocore signs, this gate recomputes the signature from the request it received and
refuses what does not match, answering as SQS does, and forwards the rest unchanged.

The signature is computed here by hand from AWS's specification (the canonical
request: method, URI-encoded path, sorted query, the signed headers trimmed, the
payload's SHA-256; then the string to sign under the credential scope, and the
HMAC-SHA256 chain of the secret), not with botocore's signer, so the gate checks
botocore rather than agreeing with itself.

Refusals are SQS's in the JSON protocol (awsJson1_0) that botocore speaks to SQS
(botocore/data/sqs/2012-11-05/service-2.json: "protocol": "json", query-compatible):
HTTP 400/403, a body {"__type": ..., "message": ...} with AWS's front end's exception
type, and the header ``x-amzn-query-error: Code;Sender`` that a query-compatible
service adds and from which botocore takes the error code
(parsers.BaseJSONParser._do_query_compatible_error_parse). So boto3 raises ClientError
with the codes AWS documents: InvalidClientTokenId (an access key id it does not know),
SignatureDoesNotMatch (another secret; a date over 15 minutes from now, "Signature
expired"), IncompleteSignature (a malformed Authorization header),
MissingAuthenticationToken (none). A wrong signature's message goes on, as AWS's does,
with the canonical request and string to sign it expected, over several lines.
``Gate.query_error_header = False`` leaves the header out: botocore's code is then the
__type's (InvalidSignatureException, UnrecognizedClientException...). The __type is
what SQS's JSON endpoint was reported to answer (async-aws/aws#1948: HTTP 403,
InvalidSignatureException); that client reads no x-amzn-query-error, so whether SQS
sends one with these refusals is not known here. The statuses, types and wording are
AWS's as documented and reported, not captured from SQS (no AWS account in the tests).

Not done: session tokens (X-Amz-Security-Token is forwarded, not checked), presigned
query-string auth, chunked request bodies (botocore sends SQS a Content-Length)."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import http.client
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlsplit

MAX_SKEW = datetime.timedelta(minutes=15)  # AWS refuses a request signed further off
ALGORITHM = "AWS4-HMAC-SHA256"
AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})$"
)
# Not forwarded as they came: they describe this hop, not the request.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"})

# Code (botocore's Error.Code, from x-amzn-query-error) -> HTTP status, __type.
REFUSALS = {
    "MissingAuthenticationToken": (403, "com.amazon.coral.service#MissingAuthenticationTokenException"),
    "IncompleteSignature": (400, "com.amazon.coral.service#IncompleteSignatureException"),
    "InvalidClientTokenId": (403, "com.amazon.coral.service#UnrecognizedClientException"),
    "SignatureDoesNotMatch": (403, "com.amazon.coral.service#InvalidSignatureException"),
}
WRONG_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. Check your AWS Secret"
    " Access Key and signing method. Consult the service documentation for details."
)


@dataclass(frozen=True)
class Signed:
    signature: str
    canonical_request: str
    string_to_sign: str


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def expected_signature(
    secret: str,
    *,
    method: str,
    target: str,
    headers: dict[str, list[str]],
    signed_headers: list[str],
    body: bytes,
    amz_date: str,
    scope: str,
) -> Signed:
    """The signature AWS computes for a request (SigV4, AWS's documented algorithm).
    `target` is the request line's path and query as sent; `headers` by lower-case name."""
    parts = urlsplit(target)
    # Every service but S3 signs the path URI-encoded again (as it was sent: encoded once).
    canonical_uri = quote(parts.path or "/", safe="/~")
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in parse_qsl(parts.query, True))
    canonical_query = "&".join(f"{k}={v}" for k, v in pairs)
    canonical_headers = "".join(
        f"{name}:{','.join(' '.join(v.split()) for v in headers.get(name, []))}\n" for name in signed_headers
    )
    # The body received, hashed here: a header claiming a hash is not taken on trust
    # (a body swapped under a signature would pass), it is only signed if listed.
    payload_hash = hashlib.sha256(body).hexdigest()
    canonical_request = "\n".join(
        [method, canonical_uri, canonical_query, canonical_headers, ";".join(signed_headers), payload_hash]
    )
    string_to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    date, region, service, terminator = scope.split("/")
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), date), region), service), terminator)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return Signed(signature, canonical_request, string_to_sign)


@dataclass
class Gate:
    """The running gate: its endpoint, the identities it knows (access key id ->
    secret; change it to rotate a key while it runs), and what it did."""

    port: int
    keys: dict[str, str]
    region: str
    service: str = "sqs"
    # False: refusals without x-amzn-query-error, as a JSON service that is not
    # query-compatible answers; botocore then takes the code from __type.
    query_error_header: bool = True
    passed: int = 0
    refused: list[str] = field(default_factory=list)  # the codes answered, in order
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def refusal(self, method: str, target: str, headers: dict[str, list[str]], body: bytes) -> tuple[str, str] | None:
        """Why AWS would refuse this request (code, message), or None: it is signed."""
        authorization = headers.get("authorization")
        if not authorization:
            return "MissingAuthenticationToken", "Request is missing Authentication Token"
        match = AUTHORIZATION.match(authorization[0].strip())
        if match is None:
            return (
                "IncompleteSignature",
                f"Authorization header requires {ALGORITHM} Credential, SignedHeaders, Signature",
            )
        credential = match["credential"].split("/")
        if len(credential) != 5 or credential[4] != "aws4_request":
            return "IncompleteSignature", "Credential must be ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request"
        access_key, scope_date, region, service, _ = credential
        with self._lock:
            secret = self.keys.get(access_key)
        if secret is None:
            # AWS says so whatever the signature: the key is not one it has.
            return "InvalidClientTokenId", "The security token included in the request is invalid."
        amz_date = (headers.get("x-amz-date") or [""])[0]
        try:
            signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        except ValueError:
            return "IncompleteSignature", "Authorization header requires existence of a valid 'X-Amz-Date' header."
        signed = match["signed"].split(";")
        if "host" not in signed:
            return "SignatureDoesNotMatch", "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization."
        if scope_date != amz_date[:8]:
            return "SignatureDoesNotMatch", "Date in Credential scope does not match YYYYMMDD of X-Amz-Date."
        if (region, service) != (self.region, self.service):
            return "SignatureDoesNotMatch", f"Credential should be scoped to a valid region, not '{region}/{service}'."
        now = datetime.datetime.now(datetime.UTC)
        if abs(now - signed_at) > MAX_SKEW:
            # AWS's words for a request signed too long ago (or ahead): still this code.
            return "SignatureDoesNotMatch", (
                f"Signature expired: {amz_date} is now earlier than"
                f" {(now - MAX_SKEW).strftime('%Y%m%dT%H%M%SZ')} ({now.strftime('%Y%m%dT%H%M%SZ')} - 15 min.)"
            )
        expected = expected_signature(
            secret,
            method=method,
            target=target,
            headers=headers,
            signed_headers=signed,
            body=body,
            amz_date=amz_date,
            scope="/".join(credential[1:]),  # date/region/service/aws4_request
        )
        if not hmac.compare_digest(expected.signature, match["signature"]):
            # AWS's message goes on over several lines with what it computed (no secret in
            # it): a client that shows it whole shows more than one line.
            return "SignatureDoesNotMatch", (
                f"{WRONG_SIGNATURE}\n\nThe Canonical String for this request should have been\n"
                f"'{expected.canonical_request}'\n\nThe String-to-Sign should have been\n'{expected.string_to_sign}'\n"
            )
        return None


def _handler(gate: Gate, upstream_port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pool expects

        def log_message(self, format: str, *args: object) -> None:
            pass  # the tests' output stays theirs

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers: dict[str, list[str]] = {}
            for name, value in self.headers.items():
                headers.setdefault(name.lower(), []).append(value)
            why = gate.refusal(self.command, self.path, headers, body)
            if why is not None:
                self._refuse(*why)
            else:
                with gate._lock:
                    gate.passed += 1
                self._forward(body)

        do_GET = do_POST = do_PUT = do_DELETE = _handle  # http.server's names

        def _refuse(self, code: str, message: str) -> None:
            with gate._lock:
                gate.refused.append(code)
            status, kind = REFUSALS[code]
            payload = json.dumps({"__type": kind, "message": message}).encode()
            self.send_response(status)
            self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
            if gate.query_error_header:
                self.send_header("x-amzn-query-error", f"{code};Sender")
            self.send_header("Content-Type", "application/x-amz-json-1.0")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _forward(self, body: bytes) -> None:
            """The request as it came (its Host and signature too), and ElasticMQ's answer
            streamed back."""
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        upstream.putheader(name, value)
                upstream.endheaders(body)
                answer = upstream.getresponse()
                length = answer.getheader("Content-Length")
                content = None if length is not None else answer.read()  # chunked: whole, then sent with a length
                self.send_response(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)) if content is not None else str(length))
                self.end_headers()
                if content is not None:
                    self.wfile.write(content)
                else:
                    while chunk := answer.read(65536):
                        self.wfile.write(chunk)
            except OSError:
                self.close_connection = True  # ElasticMQ gone: the client sees the connection drop
            finally:
                upstream.close()

    return Handler


@contextlib.contextmanager
def sigv4_gate(upstream_port: int, keys: dict[str, str], region: str) -> Iterator[Gate]:
    """Yield a Gate on 127.0.0.1 in front of 127.0.0.1:upstream_port that knows `keys`
    (access key id -> secret) and signatures scoped to `region`/sqs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True
    gate = Gate(port=server.server_address[1], keys=dict(keys), region=region)
    server.RequestHandlerClass = _handler(gate, upstream_port)
    thread = threading.Thread(target=server.serve_forever, name="sigv4-gate", daemon=True)
    thread.start()
    try:
        yield gate
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
