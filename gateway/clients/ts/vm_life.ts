// A VM's life through HCP's REST API, driven by a typed client:
// openapi-typescript turns the document the gateway serves into
// `schema.d.ts` (cli/tests/contract.rs generates it beside a copy of this
// file in a temporary directory) and openapi-fetch calls the API with
// those types. `tsc --noEmit`-strict compilation comes first, so a
// document change that breaks these calls' typing fails the test before
// anything runs.
//
// Create with an Idempotency-Key (and the same request again: the same
// answer), wait for the job, read, stop, resize, a bad flavor answered
// with the document's Error model, delete.
//
// Environment: HCP_URL (the gateway), HCP_TOKEN (a tenant.member token
// for HCP_PROJECT), HCP_PROJECT.

import createClient from "openapi-fetch";

import type { components, paths } from "./schema.js";

type Schemas = components["schemas"];
type ApiError = Schemas["Error"];
type Job = Schemas["Job"];
type Vm = Schemas["Vm"];
type Accepted = Schemas["VmOperationAccepted"];

const JOB_DEADLINE_MS = 60_000;

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

function check(ok: boolean, what: string): asserts ok {
  if (!ok) throw new Error(what);
}

/** What one call answered, as openapi-fetch gives it. */
interface Answer<T> {
  data?: T;
  error?: ApiError;
  response: Response;
}

/** The answer's data, checked to have come with HTTP `status`. */
function expect<T>(answer: Answer<T>, status: number, what: string): T {
  const { data, error, response } = answer;
  check(
    response.status === status && data !== undefined,
    `${what}: expected ${status}, got ${response.status} ${JSON.stringify(error ?? data)}`,
  );
  return data;
}

const client = createClient<paths>({
  baseUrl: env("HCP_URL"),
  headers: { Authorization: `Bearer ${env("HCP_TOKEN")}` },
});
const project = env("HCP_PROJECT");

async function waitJob(jobId: string): Promise<Job> {
  const deadline = Date.now() + JOB_DEADLINE_MS;
  for (;;) {
    const job = expect(
      await client.GET("/api/hcp/tenant/v1/jobs/{job_id}", { params: { path: { job_id: jobId } } }),
      200,
      "get job",
    );
    if (job.status === "SUCCEEDED") return job;
    check(
      job.status !== "FAILED" && job.status !== "CANCELLED",
      `job ${jobId} (${job.kind}) ended ${job.status}: ${JSON.stringify(job.error)}`,
    );
    check(Date.now() < deadline, `job ${jobId} (${job.kind}) still ${job.status} after ${JOB_DEADLINE_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function read(vmId: string): Promise<Vm> {
  return expect(
    await client.GET("/api/hcp/tenant/v1/projects/{project_id}/vms/{vm_id}", {
      params: { path: { project_id: project, vm_id: vmId } },
    }),
    200,
    "get vm",
  );
}

async function main(): Promise<void> {
  const name = `ts-${crypto.randomUUID().slice(0, 8)}`;
  const key = crypto.randomUUID();
  const create = () =>
    client.POST("/api/hcp/tenant/v1/projects/{project_id}/vms", {
      params: { path: { project_id: project }, header: { "Idempotency-Key": key } },
      body: { name, flavor: "small", image: "debian-12" },
    });
  const created: Accepted = expect(await create(), 202, "create");
  const again: Accepted = expect(await create(), 202, "create again");
  check(
    again.vm_id === created.vm_id && again.job_id === created.job_id,
    `the same Idempotency-Key got another answer: ${JSON.stringify(again)} after ${JSON.stringify(created)}`,
  );
  const vmId = created.vm_id ?? "";
  console.log(`created ${name}: vm ${vmId}, job ${created.job_id} (replayed with the same key)`);
  await waitJob(created.job_id ?? "");

  let vm = await read(vmId);
  check(vm.name === name && vm.flavor === "small" && vm.status === "ACTIVE", `read: ${JSON.stringify(vm)}`);
  console.log(`read: ${vm.status}, ${vm.vcpus} vCPU, ${vm.memory_mib} MiB`);

  const vmPath = { project_id: project, vm_id: vmId };
  const stopped = expect(
    await client.POST("/api/hcp/tenant/v1/projects/{project_id}/vms/{vm_id}:stop", {
      params: { path: vmPath },
      body: {},
    }),
    202,
    "stop",
  );
  await waitJob(stopped.job_id ?? "");
  vm = await read(vmId);
  check(vm.status === "STOPPED", `after stop: ${JSON.stringify(vm)}`);
  console.log("stopped");

  const resized = expect(
    await client.POST("/api/hcp/tenant/v1/projects/{project_id}/vms/{vm_id}:resize", {
      params: { path: vmPath },
      body: { flavor: "medium" },
    }),
    202,
    "resize",
  );
  await waitJob(resized.job_id ?? "");
  vm = await read(vmId);
  check(vm.flavor === "medium" && vm.vcpus === 2 && vm.status === "STOPPED", `after resize: ${JSON.stringify(vm)}`);
  console.log(`resized to ${vm.flavor}: ${vm.vcpus} vCPU, ${vm.memory_mib} MiB`);

  const bad = await client.POST("/api/hcp/tenant/v1/projects/{project_id}/vms/{vm_id}:resize", {
    params: { path: vmPath },
    body: { flavor: "no-such-flavor" },
  });
  const error: ApiError | undefined = bad.error;
  check(bad.response.status === 400 && error !== undefined, `bad flavor: ${bad.response.status}`);
  check(
    error.code === "INVALID_ARGUMENT" && error.details["field"] === "flavor" && !!error.message && !!error.trace_id,
    `bad flavor: ${JSON.stringify(error)}`,
  );
  console.log(`bad flavor: ${bad.response.status} ${error.code} field=${error.details["field"]}: ${error.message}`);

  const deleted = expect(
    await client.DELETE("/api/hcp/tenant/v1/projects/{project_id}/vms/{vm_id}", { params: { path: vmPath } }),
    202,
    "delete",
  );
  await waitJob(deleted.job_id ?? "");
  vm = await read(vmId);
  check(vm.status === "DELETED", `after delete: ${JSON.stringify(vm)}`);
  console.log("deleted");
  console.log("vm life: ok");
}

main().catch((e: unknown) => {
  console.error(`vm life failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exit(1);
});
