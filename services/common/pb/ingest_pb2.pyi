from mmpipe.services.common.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaInput(_message.Message):
    __slots__ = ("modality", "url", "data", "path", "uuid", "key")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    modality: str
    url: str
    data: bytes
    path: str
    uuid: str
    key: str
    def __init__(self, modality: _Optional[str] = ..., url: _Optional[str] = ..., data: _Optional[bytes] = ..., path: _Optional[str] = ..., uuid: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("request_id", "items", "tenant", "media_io_kwargs_json", "mm_processor_kwargs_json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_IO_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    MM_PROCESSOR_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[MediaInput]
    tenant: str
    media_io_kwargs_json: str
    mm_processor_kwargs_json: str
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[MediaInput, _Mapping]]] = ..., tenant: _Optional[str] = ..., media_io_kwargs_json: _Optional[str] = ..., mm_processor_kwargs_json: _Optional[str] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.EmbeddingRef]
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.EmbeddingRef, _Mapping]]] = ...) -> None: ...
