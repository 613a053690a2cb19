"""Wire names: labels, annotations, files and environment variables.

These are part of the API (SPEC section 10): manifests written for the upstream system use them
unchanged, so never rename one.
"""

GROUP = "nvidia.com"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

CHECKPOINT_KIND = "DynamoCheckpoint"
CHECKPOINT_PLURAL = "dynamocheckpoints"
DGD_KIND = "DynamoGraphDeployment"
DGD_PLURAL = "dynamographdeployments"
# The DGD's second served version (upstream's components-list shape); v1alpha1 stays the storage version.
DGD_VERSION_V1BETA1 = "v1beta1"
# kubectl's unqualified `dgd` is the highest served version, v1beta1 (as upstream); with no conversion the
# object is served as written, so a write in the v1alpha1 shape (`spec.services`) names its version.
DGD_KUBECTL_V1ALPHA1 = f"{DGD_PLURAL}.{VERSION}.{GROUP}"

# Labels
LABEL_CHECKPOINT_ID = "nvidia.com/snapshot-checkpoint-id"
LABEL_IS_CHECKPOINT_SOURCE = "nvidia.com/snapshot-is-checkpoint-source"
LABEL_DGD_NAME = "nvidia.com/dynamo-graph-deployment-name"
LABEL_COMPONENT = "nvidia.com/dynamo-component"
LABEL_WORKER_HASH = "nvidia.com/dynamo-worker-hash"
LABEL_APP_COMPONENT = "app.kubernetes.io/component"
# Set by the Job controller on a Job's pods (Kubernetes' name, not ours)
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"
AGENT_COMPONENT = "snapshot-agent"
STORAGE_COMPONENT = "checkpoint-storage"

# Annotations
ANN_ARTIFACT_VERSION = "nvidia.com/snapshot-artifact-version"
ANN_TARGET_CONTAINERS = "nvidia.com/snapshot-target-containers"
ANN_CHECKPOINT_STATUS = "nvidia.com/snapshot-checkpoint-status"
# Why the agent failed a checkpoint (ours; the SPEC has only the status): the operator puts it in status.message
ANN_CHECKPOINT_MESSAGE = "nvidia.com/snapshot-checkpoint-message"
ANN_RESTORE_STATUS_PREFIX = "nvidia.com/snapshot-restore-status."
ANN_RESTORE_CONTAINER_ID_PREFIX = "nvidia.com/snapshot-restore-container-id."
# Why the agent failed the last restore of a container (ours; kept after the event has expired)
ANN_RESTORE_MESSAGE_PREFIX = "nvidia.com/snapshot-restore-message."
# The checkpoint ID whose restore into this pod the agent refused for good (ours): a later container of
# the pod is told so (restore-failed) instead of being restored, killed and restarted again
ANN_RESTORE_REFUSED_PREFIX = "nvidia.com/snapshot-restore-refused."
ANN_AUTO_CHECKPOINT = "nvidia.com/dynamo-auto-checkpoint"
ANN_DELETION_POLICY = "nvidia.com/dynamo-checkpoint-deletion-policy"
ANN_STORAGE_TYPE = "nvidia.com/snapshot-storage-type"
ANN_STORAGE_BASE_PATH = "nvidia.com/snapshot-storage-base-path"
# Values of ANN_STORAGE_TYPE, of status.storageType and of the `storage.type` settings (upstream has oci too)
STORAGE_TYPE_PVC = "pvc"
STORAGE_TYPE_S3 = "s3"
STORAGE_TYPES = (STORAGE_TYPE_PVC, STORAGE_TYPE_S3)
# Object storage: the agent's S3 credentials, as the snapshot chart sets them from the Secret
# `storage.s3.credentialsSecret` (env vars, or files of these names in `storage.s3.credentialsDirectory`)
ENV_S3_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_S3_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_S3_SESSION_TOKEN = "AWS_SESSION_TOKEN"
# Where the agent keeps the versions it uploads and fetches (node-local; the chart's hostPath)
DEFAULT_S3_LOCAL_DIRECTORY = "/var/lib/dynamo-snapshot/objects"
# Pre-staging (docs/agent.md#pre-staging): each agent's record of what its node cache holds, a Lease in the
# agent's namespace named STAGED_LEASE_PREFIX + node, labelled with the node, annotated with a JSON list of
# {"checkpointID", "version"}; it also carries LABEL_CHECKPOINT_ID (empty) so the admission policy lets the
# agent write it
STAGED_LEASE_PREFIX = "snapshot-staged-"
LABEL_STAGED_NODE = "nvidia.com/snapshot-staged-node"
ANN_STAGED = "nvidia.com/snapshot-staged"
# Removing a deleted automatic checkpoint's artifacts (docs/agent.md#deleting-from-object-storage). The
# finalizer holds every automatic DynamoCheckpoint until they are gone. With object storage the operator asks
# with the condition CONDITION_ARTIFACTS_REMOVED (status False, reason REASON_CLEANUP_REQUESTED) once nothing
# writes the checkpoint any more; one agent takes the Lease CLEANUP_LEASE_PREFIX + checkpoint ID in the
# checkpoint's namespace (owned by the DynamoCheckpoint, labelled with its ID), deletes the objects and
# writes the outcome on it: ANN_CLEANUP_STATUS (STATUS_IN_PROGRESS, STATUS_COMPLETED, STATUS_FAILED) and
# ANN_CLEANUP_MESSAGE
FINALIZER_CHECKPOINT_CLEANUP = "nvidia.com/checkpoint-cleanup"
CONDITION_ARTIFACTS_REMOVED = "ArtifactsRemoved"
REASON_CLEANUP_REQUESTED = "Requested"
CLEANUP_LEASE_PREFIX = "checkpoint-cleanup-"
ANN_CLEANUP_STATUS = "nvidia.com/snapshot-cleanup-status"
ANN_CLEANUP_MESSAGE = "nvidia.com/snapshot-cleanup-message"
# Node labels of NVIDIA's GPU feature discovery, matched against the checkpoint's GPU
NODE_LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
NODE_LABEL_DRIVER_VERSION = "nvidia.com/cuda.driver-version.full"
NODE_LABELS_DRIVER_PARTS = (
    "nvidia.com/cuda.driver.major", "nvidia.com/cuda.driver.minor", "nvidia.com/cuda.driver.rev")
RESOURCE_GPU = "nvidia.com/gpu"
# On a DGD's ReplicaSet: the hash of the pod template the operator wrote
ANN_POD_TEMPLATE_HASH = "nvidia.com/dynamo-pod-template-hash"

# Condition types of a batch/v1 Job (status True when reached)
JOB_COMPLETE = "Complete"
JOB_FAILED = "Failed"
# The reason of a Job's Failed condition when activeDeadlineSeconds ran out (the Job controller kills its pods)
JOB_REASON_DEADLINE_EXCEEDED = "DeadlineExceeded"
# The reason of a container's terminated state when the kernel's OOM killer ended it
CONTAINER_REASON_OOM_KILLED = "OOMKilled"

DEFAULT_ARTIFACT_VERSION = "1"

# Values of ANN_CHECKPOINT_STATUS / ANN_RESTORE_STATUS_PREFIX + container
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_IN_PROGRESS = "in_progress"


def restore_status_annotation(container: str) -> str:
    return ANN_RESTORE_STATUS_PREFIX + container


def restore_container_id_annotation(container: str) -> str:
    return ANN_RESTORE_CONTAINER_ID_PREFIX + container


def restore_message_annotation(container: str) -> str:
    return ANN_RESTORE_MESSAGE_PREFIX + container


def restore_refused_annotation(container: str) -> str:
    return ANN_RESTORE_REFUSED_PREFIX + container


# The /snapshot-control contract (SPEC section 8)
CONTROL_VOLUME = "snapshot-control"
CONTROL_DIR = "/snapshot-control"
ENV_CONTROL_DIR = "DYN_SNAPSHOT_CONTROL_DIR"
ENV_RESTORE_STANDBY = "DYN_SNAPSHOT_RESTORE_STANDBY"
FILE_READY_FOR_SNAPSHOT = "ready-for-snapshot"
# Ours: the agent refused a restore that no retry can fix (JSON {"reason": ...}); snapshot-init starts the
# workload cold when ENV_RESTORE_FALLBACK is "cold" (startupPolicy Immediate), else keeps waiting
FILE_RESTORE_FAILED = "restore-failed"
ENV_RESTORE_FALLBACK = "DYN_SNAPSHOT_RESTORE_FALLBACK"
RESTORE_FALLBACK_COLD = "cold"
# What guide-era upstream workers write instead; read with the same meaning (docs/compatibility.md)
FILE_READY_FOR_CHECKPOINT_LEGACY = "ready-for-checkpoint"
# In the ready-for-snapshot body: the files a worker re-reads after a restore (dynamo_snapshot.workload
# writes the same name and limit; it cannot import this package)
FIELD_REREAD_AFTER_RESTORE = "rereadAfterRestore"
MAX_REREAD_PATHS = 1024
FILE_SNAPSHOT_COMPLETE = "snapshot-complete"
FILE_RESTORE_COMPLETE = "restore-complete"

# snapshot-init, PID 1 of the placeholder image: where the image puts it.
SNAPSHOT_INIT_PATH = "/usr/local/bin/snapshot-init"

# Artifact layout (SPEC section 6): <basePath>/<checkpointID>/versions/<artifactVersion>/
VERSIONS_DIR = "versions"
STAGING_DIR = "tmp"
MANIFEST_FILE = "manifest.json"
MANIFEST_MAC_FILE = "manifest.json.mac"  # HMAC-SHA256 of manifest.json by an agent key (docs/security.md)
MANIFEST_KEY_FIELD = "keyID"  # the manifest field naming the key that authenticated it
DUMP_LOG_FILE = "dump.log"
DELETED_FILES_FILE = "deleted-files.json"
