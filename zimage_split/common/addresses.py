"""Service addresses as users type them: a host alone gets the service's default port."""

from __future__ import annotations

# gRPC target schemes whose addresses are left as they are ("dns:" is read as our own dns:NAME:PORT).
OTHER_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "ipv4:", "ipv6:")


def with_default_port(address: str, port: int) -> str:
    """`address` with `:port` added when it names a host alone: `localhost`, `10.0.0.5`, `[::1]` or `::1`
    (gRPC would dial 443 there, the HTTPS port). `dns:NAME` becomes `dns:NAME:port`; an address with a port,
    and gRPC target URIs (`unix:...`, `dns:///...`), are returned as they are."""
    address = address.strip()
    if address.startswith("dns:") and not address.startswith("dns:/"):
        return "dns:" + with_default_port(address.removeprefix("dns:"), port)
    if "/" in address or address.startswith(OTHER_SCHEMES):
        return address
    if address.startswith("["):
        return f"{address}:{port}" if address.endswith("]") else address
    if address.count(":") > 1:  # an IPv6 address without brackets, so without a port
        return f"[{address}]:{port}"
    return address if ":" in address or not address else f"{address}:{port}"


def host_of(address: str) -> str:
    """The host of an address, with or without its port (`[::1]:50051`, `[::1]` and `::1` give `::1`)."""
    with_port = with_default_port(address, 0).removeprefix("dns:")
    return (with_port.rpartition(":")[0] or with_port).strip("[]")
