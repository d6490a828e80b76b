from mmpipe.services.common.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProcessedInput(_message.Message):
    __slots__ = ("key", "modality", "tensors", "content_hash", "uuid")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    key: str
    modality: str
    tensors: bytes
    content_hash: str
    uuid: str
    def __init__(self, key: _Optional[str] = ..., modality: _Optional[str] = ..., tensors: _Optional[bytes] = ..., content_hash: _Optional[str] = ..., uuid: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "items")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[ProcessedInput]
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ProcessedInput, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.EmbeddingRef]
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.EmbeddingRef, _Mapping]]] = ...) -> None: ...

class EmbeddingsInput(_message.Message):
    __slots__ = ("modality", "tensors", "uuid")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    modality: str
    tensors: bytes
    uuid: str
    def __init__(self, modality: _Optional[str] = ..., tensors: _Optional[bytes] = ..., uuid: _Optional[str] = ...) -> None: ...

class PutEmbeddingsRequest(_message.Message):
    __slots__ = ("request_id", "items", "tenant", "media_io_kwargs_json", "mm_processor_kwargs_json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_IO_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    MM_PROCESSOR_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[EmbeddingsInput]
    tenant: str
    media_io_kwargs_json: str
    mm_processor_kwargs_json: str
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[EmbeddingsInput, _Mapping]]] = ..., tenant: _Optional[str] = ..., media_io_kwargs_json: _Optional[str] = ..., mm_processor_kwargs_json: _Optional[str] = ...) -> None: ...

class PutEmbeddingsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.EmbeddingRef]
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.EmbeddingRef, _Mapping]]] = ...) -> None: ...

class LookupItem(_message.Message):
    __slots__ = ("key", "modality", "uuid", "content_hash")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    key: str
    modality: str
    uuid: str
    content_hash: str
    def __init__(self, key: _Optional[str] = ..., modality: _Optional[str] = ..., uuid: _Optional[str] = ..., content_hash: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("request_id", "items", "tenant", "media_io_kwargs_json", "mm_processor_kwargs_json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_IO_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    MM_PROCESSOR_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[LookupItem]
    tenant: str
    media_io_kwargs_json: str
    mm_processor_kwargs_json: str
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[LookupItem, _Mapping]]] = ..., tenant: _Optional[str] = ..., media_io_kwargs_json: _Optional[str] = ..., mm_processor_kwargs_json: _Optional[str] = ...) -> None: ...

class LookupResult(_message.Message):
    __slots__ = ("found", "ref")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    found: bool
    ref: _common_pb2.EmbeddingRef
    def __init__(self, found: _Optional[bool] = ..., ref: _Optional[_Union[_common_pb2.EmbeddingRef, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LookupResult]
    def __init__(self, items: _Optional[_Iterable[_Union[LookupResult, _Mapping]]] = ...) -> None: ...
