"""The 20-second GPU smoke check that scripts/gpu_check.sh runs first (and alone with --smoke).

Every GPU backend (triton, cuda) of every fused loss rcfast has -- dense,
top-k teacher, fused with the last linear layer -- against the pure-PyTorch
reference computed in float64, forward and gradient, on a few shapes that
cross the kernels' code paths (narrow heads, a wide split head, padding in the
top-k, half precision, a near-overflow logit); then the dense loss under
``torch.cuda.set_sync_debug_mode("error")`` (no host synchronisation on a
second call); then three fp16 GradScaler training steps of a small student.
Exits non-zero, naming each mismatch, on any failure.
"""
from __future__ import annotations

import sys
import time

import torch

import rcfast

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(f"{name}: {detail}")


def dense_cases():
    g = torch.Generator(device="cuda").manual_seed(0)
    yield "4 heads fp32", (torch.randn(64, 611, device="cuda", generator=g) * 3, (300, 196, 100, 15), torch.float32)
    yield "1-class + wide bf16", (torch.randn(8, 70001, device="cuda", generator=g) * 3, (1, 70000), torch.bfloat16)
    yield "fp16", (torch.randn(33, 1000, device="cuda", generator=g) * 3, (1000,), torch.float16)
    near = torch.randn(4, 16, device="cuda", generator=g)
    near[0, 0] = 88.0  # just below float32 exp overflow (issue 8 item 1)
    yield "near exp overflow", (near, (16,), torch.float32)


def check_dense() -> None:
    backends = [b for b in ("triton", "cuda") if b in rcfast.available_backends()]
    check("dense backends present", backends == ["triton", "cuda"], f"available: {rcfast.available_backends()}")
    for backend in backends:
        for name, (base, heads, dtype) in dense_cases():
            student = base.detach().to(dtype).requires_grad_(True)
            teacher = (base.flip(0) * 0.7).to(dtype)
            loss = rcfast.multihead_kd_loss(student, teacher, list(heads), temperature=2.0, backend=backend)
            loss.backward()
            ref_s = student.detach().double().requires_grad_(True)
            ref = rcfast.multihead_kd_loss(ref_s, teacher.double(), list(heads), temperature=2.0, backend="reference")
            ref.backward()
            tol = 2e-2 if dtype != torch.float32 else 1e-4
            loss_err = abs(loss.item() - ref.item()) / max(1.0, abs(ref.item()))
            grad_err = ((student.grad.double() - ref_s.grad).abs().max() / ref_s.grad.abs().max().clamp_min(1e-12)).item()
            check(f"{backend} {name} loss", loss_err <= tol, f"rel err {loss_err:.2e}")
            check(f"{backend} {name} grad", grad_err <= tol, f"max rel err {grad_err:.2e}")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


def check_sparse() -> None:
    """Top-k teachers: the sparse op against the dense float64 reference on the same -inf-filled teacher."""
    g = torch.Generator(device="cuda").manual_seed(1)
    heads, k = [300, 5, 1000], 8
    student = torch.randn(48, sum(heads), device="cuda", generator=g) * 3
    teacher = torch.randn(48, sum(heads), device="cuda", generator=g) * 3
    values, indices, dense = [], [], []
    for t_h in teacher.split(heads, dim=1):
        top = t_h.topk(min(k, t_h.shape[1]), dim=1)
        pad = k - top.values.shape[1]
        values.append(torch.nn.functional.pad(top.values, (0, pad), value=float("-inf")))
        indices.append(torch.nn.functional.pad(top.indices, (0, pad), value=-1))
        dense.append(torch.full_like(t_h, float("-inf")).scatter(1, top.indices, top.values))
    values, indices, dense = torch.stack(values, 1), torch.stack(indices, 1).int(), torch.cat(dense, 1)
    ref_s = student.double().requires_grad_(True)
    ref = rcfast.multihead_kd_loss(ref_s, dense.double(), heads, temperature=2.0, backend="reference")
    ref.backward()
    for backend in ("triton", "cuda"):
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            s = student.detach().to(dtype).requires_grad_(True)
            try:
                loss = rcfast.sparse_multihead_kd_loss(s, values.to(dtype), indices, heads, temperature=2.0,
                                                       backend=backend)
                loss.backward()
            except Exception as error:  # an unavailable backend is a failure here, not a skip
                check(f"sparse {backend} {dtype}", False, f"{type(error).__name__}: {error}")
                continue
            loss_err = abs(loss.item() - ref.item()) / max(1.0, abs(ref.item()))
            check(f"sparse {backend} {dtype} loss", loss_err <= tol, f"rel err {loss_err:.2e}")
            check(f"sparse {backend} {dtype} grad", relative_error(s.grad, ref_s.grad) <= tol,
                  f"max rel err {relative_error(s.grad, ref_s.grad):.2e}")


def check_fused_linear() -> None:
    """The last linear layer fused with the loss, a 40k-class head split over chunks, vs float64 unfused."""
    g = torch.Generator(device="cuda").manual_seed(2)
    heads = [40000, 1000]
    hidden = torch.randn(64, 256, device="cuda", generator=g)
    weight = torch.randn(sum(heads), 256, device="cuda", generator=g) * 0.05
    teacher = torch.randn(64, sum(heads), device="cuda", generator=g) * 3
    ref_h, ref_w = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = rcfast.multihead_kd_loss(ref_h @ ref_w.T, teacher.double(), heads, temperature=2.0, backend="reference")
    ref.backward()
    for backend in ("triton", "cuda"):
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
            h = hidden.detach().to(dtype).requires_grad_(True)
            w = weight.detach().to(dtype).requires_grad_(True)
            try:
                loss = rcfast.fused_linear_multihead_kd_loss(h, w, teacher.to(dtype), heads, temperature=2.0,
                                                             backend=backend)
                loss.backward()
            except Exception as error:
                check(f"fused linear {backend} {dtype}", False, f"{type(error).__name__}: {error}")
                continue
            loss_err = abs(loss.item() - ref.item()) / max(1.0, abs(ref.item()))
            check(f"fused linear {backend} {dtype} loss", loss_err <= tol, f"rel err {loss_err:.2e}")
            for name, grad, ref_grad in (("dh", h.grad, ref_h.grad), ("dW", w.grad, ref_w.grad)):
                err = relative_error(grad, ref_grad)
                check(f"fused linear {backend} {dtype} {name}", err <= tol, f"max rel err {err:.2e}")


def check_no_host_sync() -> None:
    student = torch.randn(32, 300, device="cuda", requires_grad=True)
    teacher = torch.randn(32, 300, device="cuda")
    for backend in [b for b in ("triton", "cuda") if b in rcfast.available_backends()]:
        rcfast.multihead_kd_loss(student, teacher, [100, 200], temperature=[2.0, 4.0], backend=backend).backward()
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            rcfast.multihead_kd_loss(student, teacher, [100, 200], temperature=[2.0, 4.0], backend=backend).backward()
            ok, detail = True, ""
        except RuntimeError as error:
            ok, detail = False, str(error).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        check(f"{backend} second call without host sync", ok, detail)


def check_fp16_training() -> None:
    from rcfast.models import build_student

    student = build_student("small_cnn", {"a": 5, "b": 7}, width=8).cuda()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda")
    images = torch.randn(16, 3, 32, 32, device="cuda")
    teacher = torch.randn(16, 12, device="cuda") * 3
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            logits = student(images)  # packed [B, 5 + 7]
            loss = rcfast.multihead_kd_loss(logits, teacher, [5, 7], temperature=2.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    finite = all(torch.isfinite(p).all() for p in student.parameters())
    check("fp16 GradScaler steps", finite and all(map(lambda v: v == v, losses)), f"losses {losses}")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible to torch", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    check_dense()
    check_sparse()
    check_fused_linear()
    check_no_host_sync()
    check_fp16_training()
    print(f"gpu_smoke: {len(FAILURES)} failure(s) in {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
