"""A small asynchronous Kubernetes API client: one aiohttp session, generic resource operations, JSON
decoded with msgspec into plain dicts or the structs you name.

    async with Client.from_config() as client:
        pod = await client.get(PODS, "web-0", "default")
        page = await client.list(DYNAMO_CHECKPOINTS, "ns", label_selector="a=b", type=DynamoCheckpoint)
        async with client.watch(PODS, "ns", resource_version=page.resource_version) as events:
            async for event in events: ...

Create one Client per process and share it: it holds the connection pool. Errors are `ApiError`
subclasses with the server's status code, reason and message, or `TransportError` when no answer came.
"""

from __future__ import annotations

import enum
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp
import msgspec
import structlog
import yarl

from dynamo_snapshot.kube.config import ClusterConfig, load_config
from dynamo_snapshot.kube.errors import TransportError, Unauthorized, api_error
from dynamo_snapshot.kube.resources import Resource, object_key

__all__ = ["DEFAULT_USER_AGENT", "Client", "ObjectList", "PatchType", "WatchEvent"]

T = TypeVar("T")
log = structlog.get_logger("dynamo_snapshot.kube.client")

DEFAULT_USER_AGENT = "dynamo-snapshot/0.1 (python; aiohttp)"
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


class PatchType(enum.StrEnum):
    MERGE = "application/merge-patch+json"
    STRATEGIC = "application/strategic-merge-patch+json"
    JSON = "application/json-patch+json"
    APPLY = "application/apply-patch+yaml"


@dataclass(slots=True)
class ObjectList(Generic[T]):
    items: list[T]
    resource_version: str
    continue_token: str = ""
    remaining_item_count: int | None = None


@dataclass(slots=True)
class WatchEvent(Generic[T]):
    """One line of a watch stream. `type` is ADDED, MODIFIED, DELETED or BOOKMARK (ERROR is raised)."""

    type: str
    object: T
    resource_version: str


class _ListMeta(msgspec.Struct, rename="camel"):
    resource_version: str = ""
    # `continue` is a keyword: renamed explicitly
    continue_token: str = msgspec.field(default="", name="continue")
    remaining_item_count: int | None = None


class _List(msgspec.Struct, Generic[T]):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[T] | None = None
    kind: str = ""


class _RawEvent(msgspec.Struct):
    type: str
    object: msgspec.Raw


class _MetaOnly(msgspec.Struct, rename="camel"):
    resource_version: str = ""


class _Bookmark(msgspec.Struct):
    metadata: _MetaOnly = msgspec.field(default_factory=_MetaOnly)


_decoders: dict[Any, msgspec.json.Decoder] = {}


def decoder(type_: Any) -> msgspec.json.Decoder:
    """A cached msgspec JSON decoder for `type_` (Any: plain dicts)."""
    found = _decoders.get(type_)
    if found is None:
        found = _decoders[type_] = msgspec.json.Decoder(type_)
    return found


_encoder = msgspec.json.Encoder()
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar and "/": kept as they are in a path


def _params(**values: Any) -> dict[str, str]:
    out = {}
    for key, value in values.items():
        if value is None or value == "":
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


class Client:
    """The API client. `async with Client(config) as client:` or `await client.close()` when done."""

    def __init__(self, config: ClusterConfig, *, user_agent: str = DEFAULT_USER_AGENT, timeout: float = 30.0,
                 max_connections: int = 256):
        self.config = config
        self.user_agent = user_agent
        self.timeout = timeout
        self.max_connections = max_connections
        self._ssl = config.ssl_context() if config.server.startswith("https") else None
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, kubeconfig: Any = None, *, context: str | None = None, **kwargs: Any) -> Client:
        """A client for an explicit kubeconfig, KUBECONFIG, the in-cluster service account or ~/.kube/config."""
        return cls(load_config(kubeconfig, context=context), **kwargs)

    @property
    def namespace(self) -> str:
        """The default namespace of the configuration (the pod's own namespace in a cluster)."""
        return self.config.namespace

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl else False, limit=self.max_connections)
            self._session = aiohttp.ClientSession(
                connector=connector,
                # The API server's answers set no cookie a client must send back (client-go keeps none): no
                # jar to filter on every request and to fill from every response.
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": self.user_agent, "Accept": "application/json"},
                # No total: a large LIST may take long; a silent connection may not.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> Client:
        self._get_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- raw requests ----------------------------------------------------------------------------------
    @asynccontextmanager
    async def _response(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                        body: Any = None, content_type: str = "application/json",
                        client_timeout: aiohttp.ClientTimeout | None = None,
                        ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open response with a 2xx status; anything else raises ApiError or TransportError."""
        data = None
        headers: dict[str, str] = {}
        if body is not None:
            data = body if isinstance(body, bytes) else _encoder.encode(body)
            headers["Content-Type"] = content_type
        extra: dict[str, Any] = {"timeout": client_timeout} if client_timeout else {}
        if self.config.tls_server_name:
            extra["server_hostname"] = self.config.tls_server_name
        for attempt in (1, 2):
            if auth := await self.config.authorization():
                headers["Authorization"] = auth
            try:
                async with self._get_session().request(
                    method, self._url(path, params), data=data, headers=headers, **extra,
                ) as response:
                    if response.status >= 400:
                        raw = await response.read()
                        try:
                            decoded: Any = msgspec.json.decode(raw)
                        except msgspec.DecodeError:
                            decoded = raw
                        retry_after = response.headers.get("Retry-After")
                        err = api_error(response.status, decoded, method=method, path=path,
                                        retry_after=float(retry_after) if retry_after and
                                        retry_after.isdigit() else None)
                        if isinstance(err, Unauthorized) and attempt == 1 and not self.config.token and (
                                self.config.token_file or self.config.exec):
                            self.config.invalidate_token()  # rotated token: read or exec it again, once
                            continue
                        raise err
                    yield response
                    return
            except _TRANSPORT_ERRORS as err:
                raise TransportError(method, path, err) from err

    def _url(self, path: str, params: Mapping[str, str] | None) -> yarl.URL:
        """The request's URL, encoded here once: given a string and params, aiohttp has yarl parse it, encode
        it again and merge the query on every request. Paths are made of API names (``resources.py``)."""
        path, _, query = path.partition("?")  # a caller's own query string is kept as given
        url = self.config.server + urllib.parse.quote(path, safe=_PATH_SAFE)
        query = "&".join(q for q in (query, urllib.parse.urlencode(params) if params else "") if q)
        return yarl.URL(f"{url}?{query}" if query else url, encoded=True)

    async def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json", type: Any = Any) -> Any:
        """Any API call by path; the JSON answer decoded as `type` (plain Python values by default)."""
        async with self._response(method, path, params=params, body=body, content_type=content_type) as resp:
            try:
                raw = await resp.read()
            except _TRANSPORT_ERRORS as err:
                raise TransportError(method, path, err) from err
        if not raw:
            return None
        return decoder(type).decode(raw)

    # -- resource operations -----------------------------------------------------------------------------
    async def get(self, resource: Resource, name: str, namespace: str | None = None, *,
                  subresource: str | None = None, type: Any = Any) -> Any:
        return await self.request("GET", resource.path(namespace, name, subresource), type=type)

    async def list(self, resource: Resource, namespace: str | None = None, *, label_selector: str | None = None,
                   field_selector: str | None = None, limit: int | None = None, continue_token: str | None = None,
                   resource_version: str | None = None, resource_version_match: str | None = None,
                   type: Any = Any) -> ObjectList[Any]:
        """One page of a list (all of it without `limit`). `namespace=None`: every namespace."""
        params = _params(labelSelector=label_selector, fieldSelector=field_selector, limit=limit,
                         resourceVersion=resource_version, resourceVersionMatch=resource_version_match,
                         **{"continue": continue_token})
        page = await self.request("GET", resource.path(namespace), params=params, type=_List[type])
        items = page.items or []
        if type is Any and items:
            # Items of a list of built-in types carry no apiVersion/kind; watch events do. Make them alike.
            kind = resource.kind or page.kind.removesuffix("List")
            for item in items:
                if "kind" not in item:
                    item["apiVersion"] = resource.api_version
                    item["kind"] = kind
        return ObjectList(items, page.metadata.resource_version, page.metadata.continue_token,
                          page.metadata.remaining_item_count)

    async def list_all(self, resource: Resource, namespace: str | None = None, *, page_size: int = 500,
                       **kwargs: Any) -> ObjectList[Any]:
        """Every page of a list, followed through `continue` tokens; the first page's resourceVersion."""
        first = await self.list(resource, namespace, limit=page_size, **kwargs)
        items, token = first.items, first.continue_token
        kwargs.pop("resource_version", None)
        kwargs.pop("resource_version_match", None)
        while token:
            page = await self.list(resource, namespace, limit=page_size, continue_token=token, **kwargs)
            items.extend(page.items)
            token = page.continue_token
        return ObjectList(items, first.resource_version)

    @asynccontextmanager
    async def watch(self, resource: Resource, namespace: str | None = None, *, resource_version: str | None = None,
                    label_selector: str | None = None, field_selector: str | None = None,
                    timeout_seconds: int | None = None, allow_bookmarks: bool = True,
                    type: Any = Any) -> AsyncIterator[AsyncIterator[WatchEvent[Any]]]:
        """A watch stream: `async with client.watch(...) as events: async for event in events`.

        An ERROR event (the server's way to say 410 Gone inside a stream) is raised as its ApiError.
        BOOKMARK events carry only a resourceVersion: their `object` is None. `type=msgspec.Raw` leaves
        objects undecoded (the reflector decodes them one by one, to skip objects that do not fit a type).
        """
        path = resource.path(namespace)
        params = _params(watch=True, resourceVersion=resource_version, labelSelector=label_selector,
                         fieldSelector=field_selector, timeoutSeconds=timeout_seconds,
                         allowWatchBookmarks=allow_bookmarks or None)
        # No overall timeout; a silent connection is dead once the server's own timeout has long passed.
        read_timeout = (timeout_seconds + 30) if timeout_seconds else None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=read_timeout)
        async with self._response("GET", path, params=params, client_timeout=timeout) as response:
            events = self._events(response, path, type)
            try:
                yield events
            finally:
                await events.aclose()  # now, not whenever the garbage collector gets to it

    async def _events(self, response: aiohttp.ClientResponse, path: str, type_: Any) -> AsyncIterator[WatchEvent]:
        raw_events = decoder(_RawEvent)
        objects = decoder(type_)
        bookmarks = decoder(_Bookmark)
        buffer = bytearray()
        try:
            async for chunk in response.content.iter_any():
                buffer += chunk
                start = 0
                while (end := buffer.find(b"\n", start)) >= 0:
                    line = bytes(buffer[start:end])
                    start = end + 1
                    if not line.strip():
                        continue
                    event = raw_events.decode(line)
                    if event.type == "BOOKMARK":
                        rv = bookmarks.decode(event.object).metadata.resource_version
                        yield WatchEvent("BOOKMARK", None, rv)
                    elif event.type == "ERROR":
                        status = msgspec.json.decode(event.object)
                        raise api_error(int(status.get("code") or 500) if isinstance(status, dict) else 500,
                                        status, method="WATCH", path=path)
                    else:
                        obj = objects.decode(event.object)
                        if isinstance(obj, dict):
                            rv = (obj.get("metadata") or {}).get("resourceVersion", "")
                        elif isinstance(obj, msgspec.Raw):
                            rv = bookmarks.decode(obj).metadata.resource_version
                        else:
                            rv = obj.metadata.resource_version
                        yield WatchEvent(event.type, obj, rv)
                del buffer[:start]
        except _TRANSPORT_ERRORS as err:
            raise TransportError("WATCH", path, err) from err

    async def create(self, resource: Resource, body: Any, namespace: str | None = None, *,
                     field_manager: str | None = None, dry_run: bool = False, subresource: str | None = None,
                     name: str | None = None, type: Any = Any) -> Any:
        """POST a new object; namespace defaults to the body's. `subresource` posts to `name/subresource`."""
        namespace = namespace if namespace is not None else (object_key(body).namespace or None)
        params = _params(fieldManager=field_manager, dryRun="All" if dry_run else None)
        return await self.request("POST", resource.path(namespace, name, subresource), params=params,
                                  body=body, type=type)

    async def update(self, resource: Resource, body: Any, namespace: str | None = None, *,
                     subresource: str | None = None, field_manager: str | None = None, type: Any = Any) -> Any:
        """PUT the whole object (optimistic concurrency: a stale metadata.resourceVersion raises Conflict)."""
        key = object_key(body)
        namespace = namespace if namespace is not None else (key.namespace or None)
        return await self.request("PUT", resource.path(namespace, key.name, subresource),
                                  params=_params(fieldManager=field_manager), body=body, type=type)

    async def update_status(self, resource: Resource, body: Any, namespace: str | None = None, *,
                            type: Any = Any) -> Any:
        return await self.update(resource, body, namespace, subresource="status", type=type)

    async def patch(self, resource: Resource, name: str, patch: Any, namespace: str | None = None, *,
                    patch_type: PatchType = PatchType.MERGE, subresource: str | None = None,
                    field_manager: str | None = None, force: bool | None = None, type: Any = Any) -> Any:
        """PATCH: merge (default), strategic-merge, JSON patch (a list of operations) or apply."""
        params = _params(fieldManager=field_manager, force=force)
        return await self.request("PATCH", resource.path(namespace, name, subresource), params=params,
                                  body=patch, content_type=str(patch_type), type=type)

    async def patch_status(self, resource: Resource, name: str, patch: Any, namespace: str | None = None, *,
                           patch_type: PatchType = PatchType.MERGE, type: Any = Any) -> Any:
        return await self.patch(resource, name, patch, namespace, patch_type=patch_type, subresource="status",
                                type=type)

    async def apply(self, resource: Resource, body: Any, namespace: str | None = None, *, field_manager: str,
                    force: bool = False, subresource: str | None = None, type: Any = Any) -> Any:
        """Server-side apply of `body` (a full intent: apiVersion, kind, metadata.name, the fields we own)."""
        key = object_key(body)
        namespace = namespace if namespace is not None else (key.namespace or None)
        return await self.patch(resource, key.name, body, namespace, patch_type=PatchType.APPLY,
                                subresource=subresource, field_manager=field_manager, force=force, type=type)

    async def delete(self, resource: Resource, name: str, namespace: str | None = None, *,
                     propagation_policy: str | None = None, grace_period_seconds: int | None = None,
                     preconditions: dict[str, str] | None = None, dry_run: bool = False) -> Any:
        """DELETE; returns the object (still there with finalizers) or the server's Status."""
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if propagation_policy:
            options["propagationPolicy"] = propagation_policy
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if preconditions:
            options["preconditions"] = preconditions
        if dry_run:
            options["dryRun"] = ["All"]
        return await self.request("DELETE", resource.path(namespace, name), body=options)

    async def server_version(self) -> dict[str, Any]:
        return await self.request("GET", "/version")

