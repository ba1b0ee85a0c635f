"""Provision a device by CSR, then connect over MQTT TLS with the issued certificate.

The private key is made here and never leaves the device. Usage (after `make up`, with a device
profile that has a signing CA, see README "Certificates from a CSR"):

    python examples/x509_csr_client.py --key KEY --secret SECRET --name my-device \\
        [--http http://127.0.0.1:8080] [--mqtts-host localhost --mqtts-port 8883] \\
        [--ca .local/mqtt-tls/mqttserver.pub.pem] [--out ./my-device]
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_key_and_csr(name: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def provision(http: str, key: str, secret: str, name: str, csr: str) -> dict:
    body = json.dumps({"deviceName": name, "provisionDeviceKey": key, "provisionDeviceSecret": secret,
                       "credentialsType": "X509_CSR", "csr": csr}).encode()
    request = urllib.request.Request(f"{http}/api/v1/provision", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=15) as response:
        return json.loads(response.read())


def connect_tls(host: str, port: int, ca: str, cert_file: Path, key_file: Path) -> bool:
    """True when the gateway accepts the issued certificate (CONNACK 0)."""
    result: dict[str, object] = {}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.tls_set(ca_certs=ca, certfile=str(cert_file), keyfile=str(key_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_connect = lambda c, u, f, rc, p=None: (result.update(rc=rc), done.set())
    client.on_disconnect = lambda *a: done.set()
    client.connect(host, port)
    client.loop_start()
    done.wait(15)
    client.disconnect()
    client.loop_stop()
    rc = result.get("rc")
    return rc is not None and not getattr(rc, "is_failure", True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True, help="provision key of the device profile")
    parser.add_argument("--secret", required=True, help="provision secret of the device profile")
    parser.add_argument("--name", required=True, help="device name (the certificate's CN)")
    parser.add_argument("--http", default="http://127.0.0.1:8080")
    parser.add_argument("--mqtts-host", default="localhost")
    parser.add_argument("--mqtts-port", type=int, default=8883)
    parser.add_argument("--ca", default=".local/mqtt-tls/mqttserver.pub.pem", help="CA that signed the gateway")
    parser.add_argument("--out", default=None, help="folder for the key and certificate (default: ./<name>)")
    args = parser.parse_args()

    out = Path(args.out or args.name)
    out.mkdir(parents=True, exist_ok=True)
    key, csr = make_key_and_csr(args.name)
    answer = provision(args.http, args.key, args.secret, args.name, csr)
    if answer.get("status") != "SUCCESS":
        print(f"provisioning failed: {answer}", file=sys.stderr)
        return 1
    key_file, cert_file = out / "device.key", out / "device.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    cert_file.write_text(answer["credentialsValue"] + "".join(answer.get("caCertificates", [])[:-1]))
    print(f"issued certificate {answer['credentialsId'][:16]}... saved in {out}/")
    if not connect_tls(args.mqtts_host, args.mqtts_port, args.ca, cert_file, key_file):
        print("MQTT TLS connect with the issued certificate was refused", file=sys.stderr)
        return 1
    print(f"connected to mqtts://{args.mqtts_host}:{args.mqtts_port} as {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
