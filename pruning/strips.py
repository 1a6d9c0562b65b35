"""The kernel's direct sparse convolution: a convolution stored in strips (lowering.convolution_strips),
each strip up to STRIP_OUTPUTS outputs of one channel along a row of the image that read the same
non-zero weights, each weight from an input `step` further along the row for the next output.
A strip's outputs are summed together in vector registers: each weight is loaded once for all of
them, and each output's sums wait on one addition per weight, not on the output before. A full
tile of images (width 16 to 64, feature-major as kernels.py holds it) keeps a strip's eight
outputs of one vector of 16 images in registers at a time; one image (width 1) keeps
eight outputs in one vector where they read inputs one or two apart (stride 1 or 2). A strip of
fewer outputs (near the padding) is summed one output at a time."""

from pruning.jit import LANES, VECTOR, accumulate, function, load, loop, output, splat, when

STRIP_OUTPUTS = 8  # outputs of a strip, summed together: each weight loaded once for them
HALF = "<8 x float>"  # eight outputs of one image
LAYER = ("i64 %rows, ptr noalias %pointers, ptr noalias %indices, ptr noalias %data, ptr noalias %bias, i1 %relu, "
         "i64 %storage, ptr noalias %a, ptr noalias %b")  # the arguments of every layer's function in the kernel


def eight(name, base, index):
    """IR of %name = the eight floats from base[index]."""
    return (f"  %{name}.at = getelementptr inbounds float, ptr {base}, i64 {index}\n"
            f"  %{name} = load {HALF}, ptr %{name}.at, align 4\n")


def header(width):
    """IR reading strip %z's entries: %zs..%ze its weights, %zo its first output, %zc its outputs,
    %zskip the floats between the inputs of consecutive outputs, %zfull whether it is full."""
    fields = "".join(f"  %z.{k} = add i64 %z3, {k}\n" + load(f"z{name}", "i64", "%pointers", f"%z.{k}")
                     for k, name in enumerate(("s", "o", "pack", "e")))
    return ("  %z3 = mul i64 %z, 3\n" + fields + "  %zc = and i64 %zpack, 65535\n  %zstep = lshr i64 %zpack, 16\n"
            f"  %zskip = mul i64 %zstep, {width}\n  %zfull = icmp eq i64 %zc, {STRIP_OUTPUTS}\n")


def one_at_a_time(width, kind):
    """IR summing each of the strip's %zc outputs alone (a strip shorter than STRIP_OUTPUTS)."""
    vectors = range(max(1, width // LANES))
    zero = "zeroinitializer" if kind == VECTOR else "0.0"
    weight = "%qw.v" if kind == VECTOR else "%qw"
    entry = (load("qw", "float", "%data", "%kq") + (splat("qw.v", "%qw") if kind == VECTOR else "")
             + load("qc", "i32", "%indices", "%kq") + "  %qc.wide = zext i32 %qc to i64\n"
             f"  %qc.row = mul i64 %qc.wide, {width}\n  %qc.off = add i64 %qc.row, %r.off\n"
             + "".join(f"  %qx{v}.i = add i64 %qc.off, {v * LANES}\n" + load(f"qx{v}", kind, "%a", f"%qx{v}.i")
                       + accumulate(f"qm{v}", f"one{v}", weight, f"%qx{v}", kind) for v in vectors))
    body = ("  %r.off = mul i64 %r, %zskip\n" + "".join(f"  store {kind} {zero}, ptr %one{v}.p\n" for v in vectors)
            + loop("kq", "%zs", "%ze", entry) + "  %qo = add i64 %zo, %r\n" + load("qb", "float", "%bias", "%qo")
            + (splat("qb.v", "%qb") if kind == VECTOR else "") + f"  %qo.row = mul i64 %qo, {width}\n")
    bias = "%qb.v" if kind == VECTOR else "%qb"
    for v in vectors:
        body += (f"  %qs{v} = load {kind}, ptr %one{v}.p\n  %qt{v} = fadd fast {kind} %qs{v}, {bias}\n"
                 f"  store {kind} %qt{v}, ptr %one{v}.p\n  %qy{v}.i = add i64 %qo.row, {v * LANES}\n"
                 + output(f"qy{v}", f"one{v}", f"%qy{v}.i", kind))
    return loop("r", 0, "%zc", body)


def strips(width):
    """IR of @strips_<width>: b = activation(convolution of a + bias) on a tile of `width` images (a
    multiple of 16), the convolution stored in %rows strips. A full strip's outputs are summed one
    vector of 16 images (%v) at a time (eight sums in registers), over its weights once per vector."""
    outputs = range(STRIP_OUTPUTS)
    entry = (load("w", "float", "%data", "%k") + splat("w.v", "%w") + load("c", "i32", "%indices", "%k")
             + f"  %c.wide = zext i32 %c to i64\n  %c.row = mul i64 %c.wide, {width}\n"
             "  %c.lane = add i64 %c.row, %v.lane\n")
    for r in outputs:
        entry += (f"  %x{r}.i = add i64 %c.lane, %zskip{r}\n" + load(f"x{r}", VECTOR, "%a", f"%x{r}.i")
                  + accumulate(f"m{r}", f"sum{r}", "%w.v", f"%x{r}"))
    vector = (f"  %v.lane = mul i64 %v, {LANES}\n"
              + "".join(f"  store {VECTOR} zeroinitializer, ptr %sum{r}.p\n" for r in outputs)
              + loop("k", "%zs", "%ze", entry))
    for r in outputs:
        vector += (f"  %o{r} = add i64 %zo, {r}\n" + load(f"b{r}", "float", "%bias", f"%o{r}")
                   + splat(f"b{r}.v", f"%b{r}") + f"  %o{r}.row = mul i64 %o{r}, {width}\n"
                   f"  %y{r}.s = load {VECTOR}, ptr %sum{r}.p\n  %y{r}.t = fadd fast {VECTOR} %y{r}.s, %b{r}.v\n"
                   f"  store {VECTOR} %y{r}.t, ptr %sum{r}.p\n  %y{r}.i = add i64 %o{r}.row, %v.lane\n"
                   + output(f"y{r}", f"sum{r}", f"%y{r}.i"))
    full = "".join(f"  %zskip{r} = mul i64 %zskip, {r}\n" for r in outputs) + loop("v", 0, width // LANES, vector)
    body = loop("z", 0, "%rows", header(width) + when("zfull", "%zfull", full, one_at_a_time(width, VECTOR)))
    return function(f"internal void @strips_{width}({LAYER})", body, counters=("z", "v", "k", "r", "kq"),
                    slots=[(f"sum{r}", VECTOR) for r in outputs] + [(f"one{v}", VECTOR) for v in range(width // LANES)])


def eight_outputs(tag, step):
    """IR of a full strip of one image whose outputs read inputs `step` (1 or 2) apart: eight sums
    in one vector, each weight times eight inputs (stride 2: the even lanes of sixteen consecutive
    inputs, the last of which lies one float past the last input read, inside the kernel's buffers,
    which end at least a float past the widest layer)."""
    if step == 1:
        inputs = eight(f"{tag}x", "%a", f"%{tag}c.wide")
    else:
        even = ", ".join(f"i32 {2 * lane}" for lane in range(8))
        inputs = (load(f"{tag}x16", VECTOR, "%a", f"%{tag}c.wide")
                  + f"  %{tag}x = shufflevector {VECTOR} %{tag}x16, {VECTOR} poison, <8 x i32> <{even}>\n")
    entry = (load(f"{tag}w", "float", "%data", f"%{tag}k")
             + f"  %{tag}w.one = insertelement {HALF} poison, float %{tag}w, i64 0\n"
             f"  %{tag}w.v = shufflevector {HALF} %{tag}w.one, {HALF} poison, <8 x i32> zeroinitializer\n"
             + load(f"{tag}c", "i32", "%indices", f"%{tag}k") + f"  %{tag}c.wide = zext i32 %{tag}c to i64\n"
             + inputs + f"  %{tag}m.s = load {HALF}, ptr %eight.p\n"
             f"  %{tag}m.t = call fast {HALF} @llvm.fmuladd.v8f32({HALF} %{tag}w.v, {HALF} %{tag}x, {HALF} %{tag}m.s)\n"
             f"  store {HALF} %{tag}m.t, ptr %eight.p\n")
    return (f"  store {HALF} zeroinitializer, ptr %eight.p\n" + loop(f"{tag}k", "%zs", "%ze", entry)
            + eight(f"{tag}b", "%bias", "%zo") + f"  %{tag}s = load {HALF}, ptr %eight.p\n"
            f"  %{tag}s.b = fadd fast {HALF} %{tag}s, %{tag}b\n"
            f"  %{tag}s.neg = fcmp olt {HALF} %{tag}s.b, zeroinitializer\n"
            f"  %{tag}s.clip = select <8 x i1> %{tag}s.neg, {HALF} zeroinitializer, {HALF} %{tag}s.b\n"
            f"  %{tag}s.y = select i1 %relu, {HALF} %{tag}s.clip, {HALF} %{tag}s.b\n"
            f"  %{tag}out = getelementptr inbounds float, ptr %b, i64 %zo\n"
            f"  store {HALF} %{tag}s.y, ptr %{tag}out, align 4\n")


def strips_of_one():
    """IR of @strips_1: the convolution for one image. A full strip whose outputs read inputs one or
    two apart (stride 1 or 2) is one vector of eight outputs; any other strip is summed one output
    at a time."""
    strip = (header(1) + "  %zunit = icmp eq i64 %zstep, 1\n  %zpair = icmp eq i64 %zstep, 2\n"
             "  %zvector = and i1 %zfull, %zunit\n  %zhalves = and i1 %zfull, %zpair\n"
             + when("zvector", "%zvector", eight_outputs("u", 1),
                    when("zhalves", "%zhalves", eight_outputs("h", 2), one_at_a_time(1, "float"))))
    return function(f"internal void @strips_1({LAYER})", loop("z", 0, "%rows", strip),
                    counters=("z", "uk", "hk", "r", "kq"), slots=[("eight", HALF), ("one0", "float")])
