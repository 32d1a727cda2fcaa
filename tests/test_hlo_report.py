"""Reading compiled HLO text: collectives per step with loop trip counts, and the TPU compiler's
reduce-scatter (an `all-reduce-scatter` fusion of an all-reduce and a slice) counted as what it is."""

from llama4_jax import hlo_report


def looped(name: str, computations: str, trips: int, root: str) -> str:
  """An HLO module whose entry runs `%body` (among `computations`) in a while loop of `trips`
  iterations over (counter, f32[8,16]), then `root` on the loop's f32[8,16] result `%y.1`."""
  return f"""HloModule {name}
{computations}
%cond (p.2: (s32[], f32[8,16])) -> pred[] {{
  %p.2 = (s32[], f32[8,16]{{1,0}}) parameter(0)
  %i.2 = s32[] get-tuple-element(%p.2), index=0
  %constant.3 = s32[] constant({trips})
  ROOT %lt.1 = pred[] compare(%i.2, %constant.3), direction=LT
}}

ENTRY %main (a.1: f32[8,16]) -> f32[8,16] {{
  %a.1 = f32[8,16]{{1,0}} parameter(0)
  %zero.1 = s32[] constant(0)
  %t.2 = (s32[], f32[8,16]{{1,0}}) tuple(%zero.1, %a.1)
  %while.1 = (s32[], f32[8,16]{{1,0}}) while(%t.2), condition=%cond, body=%body
  %y.1 = f32[8,16]{{1,0}} get-tuple-element(%while.1), index=1
  ROOT {root}
}}
"""


# A layer loop of 3 iterations whose body reduce-scatters a gradient the way the TPU compiler writes it
# and all-gathers a weight; one all-reduce outside the loop.
HLO = looped("jit_step", """
%all-reduce-scatter.7 (input.1: f32[8,16]) -> f32[8,2] {
  %input.1 = f32[8,16]{1,0:T(8,128)} parameter(0)
  %all-reduce.3 = f32[8,16]{1,0:T(8,128)} all-reduce(%input.1), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %constant.9 = u32[] constant(0)
  ROOT %dynamic-slice.2 = f32[8,2]{1,0:T(8,128)} dynamic-slice(%all-reduce.3, %constant.9, %constant.9), dynamic_slice_sizes={8,2}
}

%body (p.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %x.1 = f32[8,16]{1,0} get-tuple-element(%p.1), index=1
  %fusion.4 = f32[8,2]{1,0} fusion(%x.1), kind=kCustom, calls=%all-reduce-scatter.7, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
  %all-gather.5 = f32[8,16]{1,0} all-gather(%fusion.4), dimensions={1}, metadata={op_name="jit(step)/jvp()/dot_general"}
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %t.1 = (s32[], f32[8,16]{1,0}) tuple(%i.1, %all-gather.5)
}
""", 3, "%all-reduce.9 = f32[8,16]{1,0} all-reduce(%y.1), channel_id=2, "
        "replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add")


def test_collectives_count_loop_iterations_and_tpu_reduce_scatters():
  moved = hlo_report.collectives(HLO)
  assert moved["reduce-scatter"] == {"bytes": 3 * 8 * 2 * 4, "count": 3}  # the slice's bytes, per iteration
  assert moved["all-gather"] == {"bytes": 3 * 8 * 16 * 4, "count": 3}
  assert moved["all-reduce"] == {"bytes": 8 * 16 * 4, "count": 1}  # the one outside the fusion


def test_largest_buffers_skip_fused_computations():
  every = hlo_report.largest_buffers(HLO)
  assert {b["opcode"] for b in every[:2]} == {"all-gather", "all-reduce"}
  assert all(b["bytes"] == 8 * 16 * 4 for b in every[:2]) and every[2]["opcode"] == "fusion"
  assert all(b["opcode"] != "dynamic-slice" for b in every)  # inside the fusion: not a buffer


# A loop of 4 iterations around a conditional: one branch multiplies [8,16] x [16,32], the other
# [8,16] x [16,8].
COND_HLO = looped("jit_cond", """
%big (p.3: f32[8,16]) -> f32[8,32] {
  %p.3 = f32[8,16]{1,0} parameter(0)
  %w.1 = f32[16,32]{1,0} constant({...})
  ROOT %dot.1 = f32[8,32]{1,0} dot(%p.3, %w.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%small (p.4: f32[8,16]) -> f32[8,8] {
  %p.4 = f32[8,16]{1,0} parameter(0)
  %w.2 = f32[16,8]{1,0} constant({...})
  ROOT %dot.2 = f32[8,8]{1,0} dot(%p.4, %w.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %x.1 = f32[8,16]{1,0} get-tuple-element(%p.1), index=1
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %c.1 = f32[8,32]{1,0} conditional(%i.1, %x.1, %x.1), branch_computations={%small, %big}
  ROOT %t.1 = (s32[], f32[8,16]{1,0}) tuple(%i.1, %x.1)
}
""", 4, "%out.1 = f32[8,16]{1,0} copy(%y.1)")


def test_flops_count_loop_trips_and_the_costlier_branch():
  assert hlo_report.flops(COND_HLO)["matmul"] == 4 * 2 * 8 * 32 * 16  # not the small branch's too
