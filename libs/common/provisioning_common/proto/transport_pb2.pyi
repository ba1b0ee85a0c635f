from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CredentialsType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_TOKEN: _ClassVar[CredentialsType]
    X509_CERTIFICATE: _ClassVar[CredentialsType]
    MQTT_BASIC: _ClassVar[CredentialsType]
    LWM2M_CREDENTIALS: _ClassVar[CredentialsType]

class ResponseStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN: _ClassVar[ResponseStatus]
    SUCCESS: _ClassVar[ResponseStatus]
    NOT_FOUND: _ClassVar[ResponseStatus]
    FAILURE: _ClassVar[ResponseStatus]
ACCESS_TOKEN: CredentialsType
X509_CERTIFICATE: CredentialsType
MQTT_BASIC: CredentialsType
LWM2M_CREDENTIALS: CredentialsType
UNKNOWN: ResponseStatus
SUCCESS: ResponseStatus
NOT_FOUND: ResponseStatus
FAILURE: ResponseStatus

class ValidateDeviceTokenRequestMsg(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class ValidateDeviceX509CertRequestMsg(_message.Message):
    __slots__ = ("hash",)
    HASH_FIELD_NUMBER: _ClassVar[int]
    hash: str
    def __init__(self, hash: _Optional[str] = ...) -> None: ...

class ValidateBasicMqttCredRequestMsg(_message.Message):
    __slots__ = ("clientId", "userName", "password")
    CLIENTID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    clientId: str
    userName: str
    password: str
    def __init__(self, clientId: _Optional[str] = ..., userName: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class CredentialsDataProto(_message.Message):
    __slots__ = ("validateDeviceTokenRequestMsg", "validateDeviceX509CertRequestMsg", "validateBasicMqttCredRequestMsg")
    VALIDATEDEVICETOKENREQUESTMSG_FIELD_NUMBER: _ClassVar[int]
    VALIDATEDEVICEX509CERTREQUESTMSG_FIELD_NUMBER: _ClassVar[int]
    VALIDATEBASICMQTTCREDREQUESTMSG_FIELD_NUMBER: _ClassVar[int]
    validateDeviceTokenRequestMsg: ValidateDeviceTokenRequestMsg
    validateDeviceX509CertRequestMsg: ValidateDeviceX509CertRequestMsg
    validateBasicMqttCredRequestMsg: ValidateBasicMqttCredRequestMsg
    def __init__(self, validateDeviceTokenRequestMsg: _Optional[_Union[ValidateDeviceTokenRequestMsg, _Mapping]] = ..., validateDeviceX509CertRequestMsg: _Optional[_Union[ValidateDeviceX509CertRequestMsg, _Mapping]] = ..., validateBasicMqttCredRequestMsg: _Optional[_Union[ValidateBasicMqttCredRequestMsg, _Mapping]] = ...) -> None: ...

class ProvisionDeviceCredentialsMsg(_message.Message):
    __slots__ = ("provisionDeviceKey", "provisionDeviceSecret")
    PROVISIONDEVICEKEY_FIELD_NUMBER: _ClassVar[int]
    PROVISIONDEVICESECRET_FIELD_NUMBER: _ClassVar[int]
    provisionDeviceKey: str
    provisionDeviceSecret: str
    def __init__(self, provisionDeviceKey: _Optional[str] = ..., provisionDeviceSecret: _Optional[str] = ...) -> None: ...

class ProvisionDeviceRequestMsg(_message.Message):
    __slots__ = ("deviceName", "credentialsType", "provisionDeviceCredentialsMsg", "credentialsDataProto", "gateway")
    DEVICENAME_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALSTYPE_FIELD_NUMBER: _ClassVar[int]
    PROVISIONDEVICECREDENTIALSMSG_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALSDATAPROTO_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    deviceName: str
    credentialsType: CredentialsType
    provisionDeviceCredentialsMsg: ProvisionDeviceCredentialsMsg
    credentialsDataProto: CredentialsDataProto
    gateway: bool
    def __init__(self, deviceName: _Optional[str] = ..., credentialsType: _Optional[_Union[CredentialsType, str]] = ..., provisionDeviceCredentialsMsg: _Optional[_Union[ProvisionDeviceCredentialsMsg, _Mapping]] = ..., credentialsDataProto: _Optional[_Union[CredentialsDataProto, _Mapping]] = ..., gateway: _Optional[bool] = ...) -> None: ...

class ProvisionDeviceResponseMsg(_message.Message):
    __slots__ = ("status", "credentialsType", "credentialsValue")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALSTYPE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALSVALUE_FIELD_NUMBER: _ClassVar[int]
    status: ResponseStatus
    credentialsType: CredentialsType
    credentialsValue: str
    def __init__(self, status: _Optional[_Union[ResponseStatus, str]] = ..., credentialsType: _Optional[_Union[CredentialsType, str]] = ..., credentialsValue: _Optional[str] = ...) -> None: ...
