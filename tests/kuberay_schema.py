"""A JSON Schema of the KubeRay fields in cluster/kuberay/: RayCluster and RayJob of
`ray.io/v1`, strict at every KubeRay level (no field KubeRay does not define, each of
the type KubeRay's API types give it).

No package on the registries this project installs from ships KubeRay's CRDs, so this
is written from KubeRay's ray.io/v1 API types (RayClusterSpec, HeadGroupSpec,
WorkerGroupSpec, RayJobSpec): their JSON field names, Go types (map[string]string,
int32, bool, float32) and `required` (fields without `omitempty`). It covers their spec
fields, none of the status; a field a later operator adds must be added here before a
manifest uses it. Pod templates are left open: they are core Kubernetes objects,
validated strictly by kubernetes-validate in the same test file. `kubectl apply
--dry-run=server` against a cluster with the operator is the full check.
"""

from __future__ import annotations

INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT = {"type": "object"}  # a core Kubernetes object (pod template, Service, ...)


def strict(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


HEAD_GROUP = strict(
    {
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
        "headService": OBJECT,
        "enableIngress": {"type": "boolean"},
        "rayStartParams": STRINGS,
        "template": OBJECT,
    },
    required=("rayStartParams", "template"),
)

WORKER_GROUP = strict(
    {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": INT32,
        "minReplicas": INT32,
        "maxReplicas": INT32,
        "numOfHosts": {**INT32, "minimum": 1},
        "idleTimeoutSeconds": INT32,
        "suspend": {"type": "boolean"},
        "rayStartParams": STRINGS,
        "template": OBJECT,
        "scaleStrategy": strict(
            {
                "workersToDelete": {"type": "array", "items": {"type": "string"}},
                "multihostReplicasToDelete": {"type": "array", "items": {"type": "string"}},
            }
        ),
    },
    required=("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"),
)

CLUSTER_SPEC = strict(
    {
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": OBJECT,
        "headServiceAnnotations": STRINGS,
        "suspend": {"type": "boolean"},
    },
    required=("headGroupSpec",),
)

JOB_SPEC = strict(
    {
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "metadata": STRINGS,
        "clusterSelector": STRINGS,
        "rayClusterSpec": CLUSTER_SPEC,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "submitterPodTemplate": OBJECT,
        "submitterConfig": strict({"backoffLimit": INT32}),
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number", "minimum": 0},
        "entrypointNumGpus": {"type": "number", "minimum": 0},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": INT32,
        "activeDeadlineSeconds": {**INT32, "minimum": 1},
        "backoffLimit": INT32,
        "suspend": {"type": "boolean"},
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "deletionStrategy": OBJECT,
        "schedule": {"type": "string"},
    }
)


def document(kind: str, spec: dict) -> dict:
    return strict(
        {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": spec,
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )


SCHEMAS = {
    "RayCluster": document("RayCluster", CLUSTER_SPEC),
    "RayJob": document("RayJob", JOB_SPEC),
}


def problems(doc: dict) -> list[str]:
    """Every way `doc` (a RayCluster or RayJob) departs from the schema, as
    `path: message` lines; empty when it conforms."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(SCHEMAS[doc["kind"]])
    return [
        "/".join(str(p) for p in e.absolute_path) + ": " + e.message
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]
