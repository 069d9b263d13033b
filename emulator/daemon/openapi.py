"""OpenAPI 3 description of the array management API (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

#: longest long poll of GET /api/v1/migrations/{name}?wait=SECONDS
MAX_WAIT_S = 60
#: largest request body the API reads (413 beyond)
MAX_BODY = 64 * 1024
NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}
SIZE = {
    "oneOf": [
        {"type": "integer", "minimum": 512, "multipleOf": 512},
        {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?[KMGTP]?$", "example": "1G"},
    ]
}
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


def _ref(schema: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{schema}"}


def _body(schema: str, required: bool = True) -> dict[str, Any]:
    """A JSON request body of components' ``schema``."""
    return {"required": required, "content": {"application/json": {"schema": _ref(schema)}}}


def _resp(schema: Any, desc: str = "OK") -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "invalid input",
        401: "missing or wrong bearer token",
        404: "no such LUN or pool",
        409: "conflict",
        413: f"request body larger than {MAX_BODY} bytes",
        500: "the array's own storage failed (the message says how)",
        501: "not supported by this array model",
        503: "still waiting (a fence for its hosts' writes in flight): retry",
        507: (
            "pool full, a file system without room for a LUN's file or the array's "
            "metadata, or a size it cannot hold (code no_space), "
            "or no open file left for a LUN (code too_many_open_files)"
        ),
    }
    return {str(c): _resp(_ref("Error"), text[c]) for c in (401, *codes)}


LUN_PATH = [{"name": "name", "in": "path", "required": True, "schema": NAME}]

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "blockmig array management API", "version": "1"},
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": ERROR,
            "Pool": {
                "type": "object",
                "required": ["name", "capacity", "used", "free", "luns"],
                "properties": {
                    "name": {"type": "string"},
                    "capacity": {"type": "integer"},
                    "used": {"type": "integer"},
                    "free": {"type": "integer"},
                    "luns": {"type": "integer"},
                },
            },
            "Array": {
                "type": "object",
                "required": ["name", "model", "capabilities", "pools"],
                "properties": {
                    "name": {"type": "string"},
                    "model": {"type": "string"},
                    "description": {"type": "string"},
                    "media": {"type": "string"},
                    "capabilities": {
                        "type": "object",
                        "properties": {
                            "remote_takeover": {"type": "boolean"},
                            "async_migration": {"type": "boolean"},
                            "pool_migration": {"type": "boolean"},
                        },
                    },
                    "pools": {"type": "array", "items": _ref("Pool")},
                    "luns": {"type": "integer"},
                    "nbd": {"type": "object"},
                },
            },
            "Lun": {
                "type": "object",
                "required": ["name", "size", "allocated", "pool", "export", "state", "connected_hosts"],
                "properties": {
                    "name": {"type": "string"},
                    "size": {"type": "integer"},
                    "allocated": {"type": "integer"},
                    "pool": {"type": "string"},
                    "export": {"type": "string"},
                    "state": {
                        "type": "string",
                        "enum": ["ready", "migrating", "remote", "deleting"],
                        "description": "deleting: while a delete waits for its hosts or its migration",
                    },
                    "created": {"type": "number"},
                    "id": {
                        "type": "string",
                        "description": "the LUN's identity (a UUID), also in its export's NBD description",
                    },
                    "connected_hosts": {"type": "array", "items": {"type": "string"}},
                    "uri": {"type": "string"},
                    "fenced": {"type": "boolean", "description": "fenced for a takeover: read-only to hosts"},
                    "fence": {
                        "type": "object",
                        "description": "only while fenced",
                        "properties": {"holder": {"type": "string"}, "since": {"type": "number"}},
                    },
                },
            },
            "FenceRequest": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"holder": {"type": "string", "maxLength": 256}},
            },
            "Fence": {
                "type": "object",
                "required": ["lun", "export", "uri"],
                "properties": {
                    "lun": {"type": "string"},
                    "holder": {"type": "string"},
                    "since": {"type": "number"},
                    "export": {"type": "string", "description": "the holder's secret alias export"},
                    "uri": {
                        "type": "string",
                        "description": "nbd:// URI of the alias: full read/write access",
                    },
                },
            },
            "Connection": {
                "type": "object",
                "required": ["host", "port", "export", "uri"],
                "properties": {
                    "host": {"type": "string"},
                    "port": {"type": "integer"},
                    "export": {"type": "string"},
                    "uri": {"type": "string"},
                    "nbd_client": {"type": "string"},
                },
            },
            "LunCreate": {
                "type": "object",
                "required": ["name", "size"],
                "additionalProperties": False,
                "properties": {"name": NAME, "size": SIZE, "pool": NAME},
            },
            "LunMove": {
                "type": "object",
                "required": ["pool"],
                "additionalProperties": False,
                "properties": {"pool": NAME},
            },
            "MigrationStart": {
                "type": "object",
                "required": ["lun", "source"],
                "additionalProperties": False,
                "properties": {
                    "lun": NAME,
                    "source": {"type": "string", "example": "nbd://127.0.0.1:10809/vol"},
                    "pool": NAME,
                    "mode": {"type": "string", "enum": ["background", "active"]},
                    "throttle": {"type": "number", "minimum": 0, "description": "MB/s, 0 = unlimited"},
                    "region_size": SIZE,
                },
            },
            "MigrationUpdate": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "throttle": {
                        "type": "number",
                        "minimum": 0,
                        "description": "MB/s, 0 = unlimited; applies at once, kept across restarts",
                    },
                    "mode": {
                        "type": "string",
                        "enum": ["active"],
                        "description": "go active now (background -> active only)",
                    },
                    "source": {
                        "type": "string",
                        "example": "nbd://127.0.0.1:10810/vol",
                        "description": "where the source LUN is served now (its array came back at "
                        "another address): it must serve the same LUN (id and size; 409 if not, 400 if "
                        "unreachable); kept across restarts, waiting I/O goes on through it at once. "
                        "The only change a migration that ended with its LUN serving the source "
                        "directly (cancelled or failed: LUN state remote) takes",
                    },
                },
            },
            "Migration": {
                "type": "object",
                "required": ["lun", "source", "state", "mode", "copied_bytes", "dirty_bytes", "total_bytes"],
                "properties": {
                    "lun": {"type": "string"},
                    "source": {"type": "string"},
                    "state": {
                        "type": "string",
                        "enum": [
                            "copying",
                            "converging",
                            "cutover",
                            "completed",
                            "paused",
                            "failed",
                            "cancelled",
                        ],
                    },
                    "mode": {"type": "string", "enum": ["background", "active"]},
                    "copied_bytes": {"type": "integer"},
                    "dirty_bytes": {"type": "integer"},
                    "total_bytes": {"type": "integer"},
                    "copy_rate": {"type": "integer"},
                    "dirty_rate": {"type": "integer"},
                    "eta_seconds": {"type": "number", "nullable": True},
                    "region_size": {"type": "integer"},
                    "throttle": {"type": "number", "description": "bytes/s, 0 = unlimited"},
                    "last_error": {"type": "string"},
                    "last_error_at": {
                        "type": "number",
                        "nullable": True,
                        "description": "when last_error was last set (Unix time): the "
                        "migration may have got over it since (a source back after an outage)",
                    },
                    "source_id": {
                        "type": "string",
                        "description": "the source LUN's id, if it gives one: a source that "
                        "answers with another is refused",
                    },
                },
            },
            "LunGrow": {
                "type": "object",
                "required": ["size"],
                "additionalProperties": False,
                "properties": {"size": SIZE},
            },
        },
    },
    "paths": {
        "/api/v1/array": {
            "get": {
                "operationId": "getArray",
                "summary": "array info: model, capabilities, pools with used and free bytes",
                "responses": {"200": _resp(_ref("Array")), **_errors()},
            }
        },
        "/api/v1/luns": {
            "get": {
                "operationId": "listLuns",
                "responses": {
                    "200": _resp({"type": "array", "items": _ref("Lun")}),
                    **_errors(),
                },
            },
            "post": {
                "operationId": "createLun",
                "summary": "create a thin LUN (a sparse file) in a pool",
                "requestBody": _body("LunCreate"),
                "responses": {
                    "201": _resp(_ref("Lun"), "created"),
                    **_errors(400, 404, 409, 413, 500, 507),
                },
            },
        },
        "/api/v1/luns/{name}": {
            "parameters": LUN_PATH,
            "get": {
                "operationId": "getLun",
                "responses": {"200": _resp(_ref("Lun")), **_errors(400, 404)},
            },
            "delete": {
                "operationId": "deleteLun",
                "summary": (
                    "delete a LUN; refused (409) while hosts are connected unless force=true, "
                    "and while another delete of it runs"
                ),
                "parameters": [
                    {
                        "name": "force",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    }
                ],
                "responses": {"204": {"description": "deleted"}, **_errors(400, 404, 409, 507)},
            },
        },
        "/api/v1/luns/{name}/grow": {
            "parameters": LUN_PATH,
            "post": {
                "operationId": "growLun",
                "summary": (
                    "grow a ready LUN (409 while it migrates, serves a remote source, is fenced "
                    "or is being deleted)"
                ),
                "requestBody": _body("LunGrow"),
                "responses": {
                    "200": _resp(_ref("Lun")),
                    **_errors(400, 404, 409, 413, 500, 507),
                },
            },
        },
        "/api/v1/luns/{name}/connection": {
            "parameters": LUN_PATH,
            "get": {
                "operationId": "getLunConnection",
                "summary": "how a host attaches the LUN over NBD",
                "responses": {"200": _resp(_ref("Connection")), **_errors(400, 404)},
            },
        },
        "/api/v1/luns/{name}/stats": {
            "parameters": LUN_PATH,
            "get": {
                "operationId": "getLunStats",
                "summary": "I/O counters and latency histograms per operation",
                "responses": {"200": _resp({"type": "object"}), **_errors(400, 404)},
            },
        },
        "/api/v1/luns/{name}/fence": {
            "parameters": LUN_PATH,
            "post": {
                "operationId": "fenceLun",
                "summary": (
                    "fence a LUN for a takeover by another array: its export becomes read-only for "
                    "every host (connected ones get EPERM on writes; returns once their writes in "
                    "flight landed), and a secret alias export, unlisted, gives the holder full "
                    "access; kept across restarts. Idempotent: fencing again returns the same "
                    "alias (200), or 409 if the body names another holder than the fence's; 409 also "
                    "for a LUN that migrates or is remote"
                ),
                "requestBody": _body("FenceRequest", required=False),
                "responses": {
                    "201": _resp(_ref("Fence"), "fenced"),
                    "200": _resp(_ref("Fence"), "already fenced"),
                    **_errors(400, 404, 409, 413, 503, 507),
                },
            },
            "delete": {
                "operationId": "unfenceLun",
                "summary": (
                    "lift the fence (idempotent): the alias export goes and its clients are "
                    "disconnected, hosts may write again; deleting the LUN lifts it too"
                ),
                "responses": {"204": {"description": "not fenced (any more)"}, **_errors(400, 404, 507)},
            },
        },
        "/api/v1/luns/{name}/move": {
            "parameters": LUN_PATH,
            "post": {
                "operationId": "moveLun",
                "summary": "move a LUN to another pool of this array, live (model with pool_migration)",
                "requestBody": _body("LunMove"),
                "responses": {
                    "202": _resp(_ref("Migration"), "moving"),
                    **_errors(400, 404, 409, 413, 500, 501, 507),
                },
            },
        },
        "/api/v1/migrations": {
            "get": {
                "operationId": "listMigrations",
                "responses": {
                    "200": _resp({"type": "array", "items": _ref("Migration")}),
                    **_errors(),
                },
            },
            "post": {
                "operationId": "startMigration",
                "summary": "take a source LUN (nbd:// URI) over as a local LUN, attachable at once, "
                "and migrate its data here",
                "requestBody": _body("MigrationStart"),
                "responses": {
                    "201": _resp(_ref("Migration"), "started"),
                    **_errors(400, 404, 409, 413, 500, 501, 507),
                },
            },
        },
        "/api/v1/migrations/{name}": {
            "parameters": LUN_PATH,
            "get": {
                "operationId": "getMigration",
                "summary": "a migration's status; with wait, a long poll that answers once it has ended",
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "description": "answer once the migration is completed, failed or cancelled, "
                        "or after this many seconds, whichever comes first",
                        "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S},
                    }
                ],
                "responses": {"200": _resp(_ref("Migration")), **_errors(400, 404)},
            },
            "patch": {
                "operationId": "updateMigration",
                "summary": "change a running migration's throttle (at once, also for copies waiting "
                "on the old rate, and kept across restarts), switch it to active mode, or give "
                "the address its source LUN is served at now (also of a migration that ended "
                "with its LUN serving the source directly; anything else of an ended one is a 409)",
                "requestBody": _body("MigrationUpdate"),
                "responses": {
                    "200": _resp(_ref("Migration")),
                    **_errors(400, 404, 409, 413),
                },
            },
        },
        "/api/v1/migrations/{name}/{action}": {
            "parameters": [
                *LUN_PATH,
                {
                    "name": "action",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["pause", "resume", "cancel"]},
                },
            ],
            "post": {
                "operationId": "migrationAction",
                "summary": "pause, resume or cancel a migration (cancel: the LUN serves the source directly)",
                "responses": {
                    "200": _resp(_ref("Migration")),
                    **_errors(400, 404, 409),
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus text exposition of the per-LUN counters",
                "responses": {
                    "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    **_errors(),
                },
            }
        },
    },
}
