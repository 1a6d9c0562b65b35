"""The sparse kernel: a chain of fully connected layers run on a batch in one compiled call, each
layer stored as its non-zeros (compressed sparse rows) or whole; or a graph's layers, each reading
and writing the buffers its entry in the layer table names, a residual sum added into a layer's
outputs before its activation (wholegraph.py). It is written in LLVM's language
(jit.py) and compiled for the CPU it runs on, once a process, when a model is first prepared for
inference (under two seconds; its convolutions in strips are strips.py).

The batch is cut into tiles of 16, 32 or 64 images. A tile's activations are held feature-major,
(features, images), so that one feature of the tile is one, two or four vectors of 16 floats; its
inputs are transposed 16 by 16 with shuffles as they are read, its outputs as they are written.
Each output unit of the tile is summed in vector registers over its row's stored weights, each
weight times the vectors of the input it reads, and stored once; a layer stored whole is computed
four rows at a time, so that each input vector is loaded once for the four. A tile of one image
(batch 1) sums each output in a register, a whole row as a contiguous dot product; its first layer,
stored as its non-zeros, is taken by its columns where most of the image is zero (columns.py). Every pointer
the kernel is given is marked as overlapping no other, so nothing is reloaded or checked inside
its loops. An image with a NaN or an infinity among the inputs its model's first layer reads gets
NaN outputs, as from dense layers (summed, then tested one by one where the sum is not finite)."""

import ctypes
import functools

from pruning.columns import DECLARATIONS, columns_1, nonzero
from pruning.jit import LANES, VECTOR, accumulate, function, load, loop, output, splat, store, when
from pruning.strips import LAYER, strips, strips_of_one

NONE, RELU = 0, 1  # activation after a layer
SPARSE, WHOLE, MAX, STRIP = 0, 1, 2, 3  # how a layer's rows are stored: each its non-zeros; every row every
# column it reads; each the inputs it takes the largest of (max-pooling: no weights); a convolution's strips,
# each the non-zeros that STRIP_OUTPUTS outputs along a row of the image share (lowering.convolution_strips)
LOWEST = "0xFFF0000000000000"  # minus infinity, where a maximum starts
BLOCK = 4  # rows of a layer stored whole computed together, each input vector loaded once for them
TILES = (1, 16, 32, 64)  # the images a tile may hold
FIELDS = 10  # a layer's entry in the layer table: rows (its outputs), where its row pointers start, where its
# biases start, activation, storage, the row groups the kernel walks (rows; a convolution's strips), the buffer
# it reads, the buffer it writes, the row of that buffer its outputs start at, and the buffer of the outputs
# added to its own before the activation (-1: none). Buffer k of a tile is `width` rows of the tile's images
# from one + k * (two - one): a chain reads buffers 0, 1, 0, ... and writes 1, 0, 1, ...
PLAN = ("layers", "count", "indptr", "indices", "data", "bias", "blocks", "block_count", "inputs", "outputs",
        "columns", "column_count", "first_indices", "checked", "checked_count", "by_columns", "lit_most",
        "column_pointers", "column_rows", "column_values", "column_bias")  # the model, as the kernel is given it
# (int64 each); by_columns: the buffer one image lists its inputs that are not zero in, where its first layer
# may be taken by columns (else 0), up to lit_most of them (columns.py)
ARGUMENTS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]  # of run_<tile>: see driver
IMAGE = ("plan", "scales", "inputs", "one", "two")  # what run_image is given of one model (int64 each)


def layer(width):
    """IR of @layer_<width>: b = activation(W a + bias) on a tile of `width` images (a multiple of
    16), a and b feature-major. A layer stored whole goes BLOCK rows at a time; a sparse row's
    weights alternate between two sets of sums, so that each sum waits on its last addition only
    every other weight."""
    vectors, rows = range(width // LANES), range(BLOCK)

    def input_row(tag, k):
        """IR of %<tag>x0, %<tag>x1, ...: the vectors of the input that the layer's index k names."""
        return (load(f"{tag}c", "i32", "%indices", k)
                + f"  %{tag}c.wide = zext i32 %{tag}c to i64\n  %{tag}c.row = mul i64 %{tag}c.wide, {width}\n"
                + "".join(f"  %{tag}x{v}.i = add i64 %{tag}c.row, {v * LANES}\n"
                          + load(f"{tag}x{v}", VECTOR, "%a", f"%{tag}x{v}.i") for v in vectors))

    def weight(tag, sums, k):
        """IR adding weight k of the layer to the sums `sums`."""
        return (load(f"{tag}w", "float", "%data", k) + splat(f"{tag}w.v", f"%{tag}w") + input_row(tag, k)
                + "".join(accumulate(f"{tag}{v}", f"sum{sums}{v}", f"%{tag}w.v", f"%{tag}x{v}") for v in vectors))

    block = (load("start", "i64", "%pointers", "%i") + "  %i.second = add i64 %i, 1\n"
             + load("end", "i64", "%pointers", "%i.second") + "  %cols = sub i64 %end, %start\n")
    for r in rows:
        block += (f"  %row{r}.skip = mul i64 %cols, {r}\n  %row{r} = add i64 %start, %row{r}.skip\n"
                  f"  %bias{r}.i = add i64 %i, {r}\n" + load(f"bias{r}", "float", "%bias", f"%bias{r}.i")
                  + splat(f"bias{r}.v", f"%bias{r}")
                  + "".join(f"  store {VECTOR} %bias{r}.v, ptr %sum{r}{v}.p\n" for v in vectors))
    column = "  %k.at = add i64 %start, %k\n" + input_row("", "%k.at")  # the rows share their columns
    for r in rows:
        column += (f"  %w{r}.i = add i64 %row{r}, %k\n" + load(f"w{r}", "float", "%data", f"%w{r}.i")
                   + splat(f"w{r}.v", f"%w{r}")
                   + "".join(accumulate(f"m{r}{v}", f"sum{r}{v}", f"%w{r}.v", f"%x{v}") for v in vectors))
    block += loop("k", 0, "%cols", column) + f"  %i.out = mul i64 %i, {width}\n"
    block += "".join(f"  %o{r}{v}.i = add i64 %i.out, {r * width + v * LANES}\n"
                     + output(f"o{r}{v}", f"sum{r}{v}", f"%o{r}{v}.i") for r in rows for v in vectors)

    row = (load("first", "i64", "%pointers", "%j") + "  %j.second = add i64 %j, 1\n"
           + load("last", "i64", "%pointers", "%j.second") + load("bias.j", "float", "%bias", "%j")
           + splat("bias.j.v", "%bias.j")
           + "".join(f"  store {VECTOR} %bias.j.v, ptr %sum0{v}.p\n  store {VECTOR} zeroinitializer, ptr %sum1{v}.p\n"
                     for v in vectors)
           + "  %span = sub i64 %last, %first\n  %pairs = lshr i64 %span, 1\n")
    pair = ("  %p.two = shl i64 %p, 1\n  %p.k = add i64 %first, %p.two\n  %p.k1 = add i64 %p.k, 1\n"
            + weight("e", 0, "%p.k") + weight("f", 1, "%p.k1"))
    row += loop("p", 0, "%pairs", pair)
    row += ("  %odd = trunc i64 %span to i1\n  %odd.k = sub i64 %last, 1\n"
            + when("odd", "%odd", weight("g", 0, "%odd.k"))
            + f"  %j.out = mul i64 %j, {width}\n")
    for v in vectors:
        row += (f"  %s{v}.a = load {VECTOR}, ptr %sum0{v}.p\n  %s{v}.b = load {VECTOR}, ptr %sum1{v}.p\n"
                f"  %s{v}.c = fadd fast {VECTOR} %s{v}.a, %s{v}.b\n  store {VECTOR} %s{v}.c, ptr %sum0{v}.p\n"
                f"  %y{v}.i = add i64 %j.out, {v * LANES}\n" + output(f"y{v}", f"sum0{v}", f"%y{v}.i"))
    largest = "".join(f"  %mo{v} = load {VECTOR}, ptr %sum0{v}.p\n  %mg{v} = fcmp ogt {VECTOR} %mx{v}, %mo{v}\n"
                      f"  %mn{v} = select <16 x i1> %mg{v}, {VECTOR} %mx{v}, {VECTOR} %mo{v}\n"
                      f"  store {VECTOR} %mn{v}, ptr %sum0{v}.p\n" for v in vectors)
    pooled = (load("mfirst", "i64", "%pointers", "%q") + "  %q.second = add i64 %q, 1\n"
              + load("mlast", "i64", "%pointers", "%q.second")
              + "".join(f"  store {VECTOR} %lowest, ptr %sum0{v}.p\n" for v in vectors)
              + loop("n", "%mfirst", "%mlast", input_row("m", "%n") + largest) + f"  %q.out = mul i64 %q, {width}\n"
              + "".join(f"  %z{v}.i = add i64 %q.out, {v * LANES}\n" + output(f"z{v}", f"sum0{v}", f"%z{v}.i")
                        for v in vectors))
    body = (f"  %sparse = icmp eq i64 %storage, {SPARSE}\n  %ragged = urem i64 %rows, {BLOCK}\n"
            "  %whole = sub i64 %rows, %ragged\n  %blocked = select i1 %sparse, i64 0, i64 %whole\n"
            + splat("lowest", LOWEST) + f"  %pool = icmp eq i64 %storage, {MAX}\n"
            + when("pool", "%pool", loop("q", 0, "%rows", pooled),
                   loop("i", 0, "%blocked", block, step=BLOCK) + loop("j", "%blocked", "%rows", row)))
    return function(f"internal void @layer_{width}({LAYER})", body, counters=("i", "k", "j", "p", "q", "n"),
                    slots=[(f"sum{r}{v}", VECTOR) for r in rows for v in vectors])


def layer_of_one():
    """IR of @layer_1: b = activation(W a + bias) for one image, one output unit at a time."""
    dot = ("  %d.col = sub i64 %d, %first\n" + load("dv", "float", "%data", "%d")
           + load("dx", "float", "%a", "%d.col") + accumulate("dm", "sum", "%dv", "%dx", "float"))
    gathered = (load("sv", "float", "%data", "%s") + load("sc", "i32", "%indices", "%s")
                + "  %sc.wide = zext i32 %sc to i64\n" + load("sx", "float", "%a", "%sc.wide")
                + accumulate("sm", "sum", "%sv", "%sx", "float"))
    largest = (load("mc", "i32", "%indices", "%t") + "  %mc.wide = zext i32 %mc to i64\n"
               + load("mx", "float", "%a", "%mc.wide") + "  %mo = load float, ptr %sum.p\n"
               "  %mg = fcmp ogt float %mx, %mo\n  %mn = select i1 %mg, float %mx, float %mo\n"
               "  store float %mn, ptr %sum.p\n")
    row = (load("first", "i64", "%pointers", "%j") + "  %j.second = add i64 %j, 1\n"
           + load("last", "i64", "%pointers", "%j.second") + load("bias.j", "float", "%bias", "%j")
           + when("pool", "%pool", f"  store float {LOWEST}, ptr %sum.p\n" + loop("t", "%first", "%last", largest),
                  "  store float %bias.j, ptr %sum.p\n"
                  + when("whole", "%whole", loop("d", "%first", "%last", dot), loop("s", "%first", "%last", gathered)))
           + output("y", "sum", "%j", "float"))
    body = (f"  %whole = icmp eq i64 %storage, {WHOLE}\n  %pool = icmp eq i64 %storage, {MAX}\n"
            + loop("j", 0, "%rows", row))
    return function(f"internal void @layer_1({LAYER})", body, counters=("j", "d", "s", "t"), slots=[("sum", "float")])


def transpose():
    """IR of @transpose: 16 images' 16 consecutive inputs (rows of src, `stride` floats apart),
    as (x - shift) * inverse, stored feature-major (rows of dst, `width` floats apart). Four rounds
    of shuffles, each exchanging one bit of the image's number with one bit of the input's."""
    body = splat("shift.v", "%shift") + splat("inverse.v", "%inverse")
    for r in range(LANES):
        body += (f"  %src{r}.i = mul i64 {r}, %stride\n" + load(f"raw{r}", VECTOR, "%src", f"%src{r}.i")
                 + f"  %centred{r} = fsub {VECTOR} %raw{r}, %shift.v\n"
                 f"  %v0.{r} = fmul {VECTOR} %centred{r}, %inverse.v\n")
    for turn, bit in enumerate((1, 2, 4, 8)):
        low = ", ".join(f"i32 {lane if not lane & bit else 16 + (lane ^ bit)}" for lane in range(LANES))
        high = ", ".join(f"i32 {lane | bit if not lane & bit else 16 + lane}" for lane in range(LANES))
        for r in (r for r in range(LANES) if not r & bit):
            pair = f"{VECTOR} %v{turn}.{r}, {VECTOR} %v{turn}.{r | bit}"
            body += (f"  %v{turn + 1}.{r} = shufflevector {pair}, <16 x i32> <{low}>\n"
                     f"  %v{turn + 1}.{r | bit} = shufflevector {pair}, <16 x i32> <{high}>\n")
    body += "".join(f"  %dst{c}.i = mul i64 {c}, %width\n" + store(f"dst{c}", VECTOR, f"%v4.{c}", "%dst", f"%dst{c}.i")
                    for c in range(LANES))
    return function("internal void @transpose(ptr noalias %src, i64 %stride, ptr noalias %dst, i64 %width, "
                    "float %shift, float %inverse) alwaysinline", body)


def gather():
    """IR of @gather: inputs from..to of images first..first+width of x into a (feature-major), one
    at a time, as (x - shift) * inverse; zero for the images past `images`."""
    image = ("  %inside = icmp ult i64 %n, %images\n  %image = add i64 %first, %n\n"
             "  %row.at = mul i64 %image, %stride\n  %row = getelementptr inbounds float, ptr %x, i64 %row.at\n")
    value = ("  %a.row = mul i64 %c, %width\n  %a.i = add i64 %a.row, %n\n"
             + when("read", "%inside",
                    load("pixel", "float", "%row", "%c") + "  %centred = fsub float %pixel, %shift\n"
                    "  %scaled = fmul float %centred, %inverse\n" + store("scaled", "float", "%scaled", "%a", "%a.i"),
                    store("zero", "float", "0.0", "%a", "%a.i")))
    body = loop("n", 0, "%width", image + loop("c", "%from", "%to", value))
    return function("internal void @gather(ptr noalias %x, i64 %stride, i64 %first, i64 %images, i64 %from, "
                    "i64 %to, ptr noalias %a, i64 %width, float %shift, float %inverse)", body, counters=("n", "c"))


def scatter():
    """IR of @scatter: a full tile's outputs (rows of result, `width` apart) into out, image-major,
    16 by 16; the last outputs (past a multiple of 16) are left to the caller."""
    block = ("  %src.row = mul i64 %o, %width\n  %src.at = add i64 %src.row, %g\n"
             "  %src = getelementptr inbounds float, ptr %result, i64 %src.at\n"
             "  %dst.at = add i64 %image.at, %o\n  %dst = getelementptr inbounds float, ptr %out, i64 %dst.at\n"
             "  call void @transpose(ptr %src, i64 %width, ptr %dst, i64 %outputs, float 0.0, float 1.0)\n")
    body = (f"  %ragged = urem i64 %outputs, {LANES}\n  %blocked = sub i64 %outputs, %ragged\n"
            + loop("g", 0, "%width", "  %image.at = mul i64 %g, %outputs\n" + loop("o", 0, "%blocked", block, LANES),
                   LANES))
    return function("internal void @scatter(ptr noalias %result, i64 %width, ptr noalias %out, i64 %outputs)",
                    body, counters=("g", "o"))


def pick():
    """IR of @pick: one image's inputs `columns`, in order, into a, as (x - shift) * inverse."""
    column = (load("c", "i64", "%columns", "%j") + load("pixel", "float", "%row", "%c")
              + "  %centred = fsub float %pixel, %shift\n  %scaled = fmul float %centred, %inverse\n"
              + store("scaled", "float", "%scaled", "%a", "%j"))
    return function("internal void @pick(ptr noalias %row, ptr noalias %columns, i64 %count, ptr noalias %a, "
                    "float %shift, float %inverse)", loop("j", 0, "%count", column), counters=("j",))


def summed():
    """IR of @summed: the sum of an image's `inputs` (a row of x) added into the float at %into, in
    four vectors of sums (no fast-math: a NaN or an infinity among them stays in the sum)."""
    sums = range(4)
    four = "".join(f"  %q{j}.i = add i64 %c, {j * LANES}\n" + load(f"q{j}", VECTOR, "%row", f"%q{j}.i")
                   + f"  %q{j}.s = load {VECTOR}, ptr %sum{j}.p\n  %q{j}.t = fadd {VECTOR} %q{j}.s, %q{j}\n"
                   f"  store {VECTOR} %q{j}.t, ptr %sum{j}.p\n" for j in sums)
    one = (load("v", VECTOR, "%row", "%b") + f"  %v.s = load {VECTOR}, ptr %sum0.p\n"
           f"  %v.t = fadd {VECTOR} %v.s, %v\n  store {VECTOR} %v.t, ptr %sum0.p\n")
    tail = (load("e.v", "float", "%row", "%e") + "  %e.s = load float, ptr %into\n"
            "  %e.t = fadd float %e.s, %e.v\n  store float %e.t, ptr %into\n")
    body = ("".join(f"  store {VECTOR} zeroinitializer, ptr %sum{j}.p\n" for j in sums)
            + f"  %odd = urem i64 %inputs, {LANES}\n  %blocked = sub i64 %inputs, %odd\n"
            f"  %odd4 = urem i64 %inputs, {4 * LANES}\n  %blocked4 = sub i64 %inputs, %odd4\n"
            + loop("c", 0, "%blocked4", four, 4 * LANES) + loop("b", "%blocked4", "%blocked", one, LANES)
            + loop("e", "%blocked", "%inputs", tail)
            + "".join(f"  %all{j} = load {VECTOR}, ptr %sum{j}.p\n" for j in sums)
            + f"  %all01 = fadd {VECTOR} %all0, %all1\n  %all23 = fadd {VECTOR} %all2, %all3\n"
            f"  %all = fadd {VECTOR} %all01, %all23\n  %rest = load float, ptr %into\n"
            f"  %total = call float @llvm.vector.reduce.fadd.v16f32(float %rest, {VECTOR} %all)\n"
            "  store float %total, ptr %into\n")
    return function("internal void @summed(ptr noalias %row, i64 %inputs, ptr noalias %into)", body,
                    counters=("c", "b", "e"), slots=[(f"sum{j}", VECTOR) for j in sums])


def poison():
    """IR of @poison: one image's outputs all NaN where one of its inputs `checked` is not finite
    (x - x is NaN only for NaN and infinity), as a dense layer gives them (0 times NaN or infinity
    is NaN), though the kernel skips the zero weights that would have read it."""
    exact = (load("k.c", "i64", "%checked", "%k") + load("k.v", "float", "%row", "%k.c")
             + "  %k.d = fsub float %k.v, %k.v\n  %k.bad = fcmp uno float %k.d, 0.0\n  %k.was = load i1, ptr %seen.p\n"
             "  %k.now = or i1 %k.was, %k.bad\n  store i1 %k.now, ptr %seen.p\n")
    nan = store("nan", "float", "0x7FF8000000000000", "%out", "%u")
    body = ("  store i1 false, ptr %seen.p\n" + loop("k", 0, "%count", exact)
            + "  %read = load i1, ptr %seen.p\n" + when("read", "%read", loop("u", 0, "%outputs", nan)))
    return function("internal void @poison(ptr noalias %row, ptr noalias %checked, i64 %count, ptr noalias %out, "
                    "i64 %outputs)", body, counters=("k", "u"), slots=[("seen", "i1")])


def driver(width):
    """IR of @run_<width>(plan, scales, x, stride, first, last, out, one, two): images first..last
    of x (rows `stride` floats apart) through every layer in tiles of `width`, into out. `plan`
    holds the model (PLAN's fields, in order), `scales` the input normalisation (shift, inverse).
    A full tile's inputs are transposed 16 by 16 in the blocks of 16 inputs some weight reads; the
    last inputs (past a multiple of 16) and a part tile (zero past the batch's end) are gathered
    one by one; one image picks the columns its first layer reads. one and two are the tile's two
    buffers, each `width` times the widest layer's (or the input's) floats."""
    body = "".join(load(f"{name}.n", "i64", "%plan", k) for k, name in enumerate(PLAN))
    body += "".join(f"  %{name} = inttoptr i64 %{name}.n to ptr\n" for name in
                    ("layers", "indptr", "indices", "data", "bias", "blocks", "columns", "first_indices", "checked",
                     "column_pointers", "column_rows", "column_values", "column_bias"))
    body += load("shift", "float", "%scales", 0) + load("inverse", "float", "%scales", 1)
    body += ("  %one.n = ptrtoint ptr %one to i64\n  %two.n = ptrtoint ptr %two to i64\n"
             "  %apart = sub i64 %two.n, %one.n\n")
    arguments = f"i64 {width}, float %shift, float %inverse"
    if width == 1:
        picked = ("  call void @pick(ptr %image, ptr %columns, i64 %column_count.n, ptr %one, float %shift, "
                  "float %inverse)\n")
        listed = ("  call void @nonzero(ptr %image, i64 %inputs.n, ptr %list, ptr %lit.p)\n"
                  "  %lit = load i64, ptr %lit.p\n  %few = icmp ule i64 %lit, %lit_most.n\n"
                  "  store i1 %few, ptr %by.p\n")
        inputs = ("  %image.at = mul i64 %t, %stride\n  %image = getelementptr inbounds float, ptr %x, i64 %image.at\n"
                  "  %list.at = mul i64 %by_columns.n, %apart\n"
                  "  %list = getelementptr inbounds i8, ptr %one, i64 %list.at\n"
                  "  store i1 false, ptr %by.p\n  %columnar = icmp ne i64 %by_columns.n, 0\n"
                  + when("columnar", "%columnar", listed) + "  %by = load i1, ptr %by.p\n"
                  + when("picked", "%by", "", picked))
    else:
        block = (load("start", "i64", "%blocks", "%b")
                 + "  %src = getelementptr inbounds float, ptr %g.src, i64 %start\n"
                 f"  %dst.row = mul i64 %start, {width}\n  %dst.at = add i64 %dst.row, %g\n"
                 "  %dst = getelementptr inbounds float, ptr %one, i64 %dst.at\n"
                 f"  call void @transpose(ptr %src, i64 %stride, ptr %dst, {arguments})\n")
        group = ("  %g.first = add i64 %t, %g\n  %g.at = mul i64 %g.first, %stride\n"
                 "  %g.src = getelementptr inbounds float, ptr %x, i64 %g.at\n"
                 + loop("b", 0, "%block_count.n", block))
        full = (loop("g", 0, width, group, LANES)
                + f"  %odd = urem i64 %inputs.n, {LANES}\n  %tail = sub i64 %inputs.n, %odd\n"
                f"  call void @gather(ptr %x, i64 %stride, i64 %t, i64 %images, i64 %tail, i64 %inputs.n, ptr %one, "
                f"{arguments})\n")
        part = (f"  call void @gather(ptr %x, i64 %stride, i64 %t, i64 %images, i64 0, i64 %inputs.n, ptr %one, "
                f"{arguments})\n")
        inputs = when("full", "%full", full, part)
    layer_entry = "".join(load(f"{field}", "i64", "%info", k) for k, field in enumerate(
        ("rows", "pointers", "biases", "activation", "storage", "groups", "reads", "writes", "offset", "adds")))
    rows = when("strip", "%strip", *(f"  call void @{kind}_{width}(i64 %groups, ptr %pointers.l, ptr %indices.l, "
                                      "ptr %data, ptr %bias.l, i1 %relu.now, i64 %storage, ptr %from, ptr %to)\n"
                                      for kind in ("strips", "layer")))
    by_columns = ("  %lit.now = load i64, ptr %lit.p\n"
                  "  call void @columns_1(ptr %image, ptr %list, i64 %lit.now, ptr %column_pointers, ptr %column_rows, "
                  "ptr %column_values, ptr %column_bias, i64 %rows, i1 %relu.now, ptr %to)\n")
    buffers = ("  %from.at = mul i64 %reads, %apart\n  %from = getelementptr inbounds i8, ptr %one, i64 %from.at\n"
               "  %to.at = mul i64 %writes, %apart\n  %to.base = getelementptr inbounds i8, ptr %one, i64 %to.at\n"
               f"  %to.row = mul i64 %offset, {width}\n"
               "  %to = getelementptr inbounds float, ptr %to.base, i64 %to.row\n"
               "  %added = icmp sge i64 %adds, 0\n  %adds.k = select i1 %added, i64 %adds, i64 %writes\n"
               "  %res.at = mul i64 %adds.k, %apart\n  %res = getelementptr inbounds i8, ptr %one, i64 %res.at\n")
    step = (f"  %info.at = mul i64 %l, {FIELDS}\n  %info = getelementptr inbounds i64, ptr %layers, i64 %info.at\n"
            + layer_entry + f"  %relu = icmp eq i64 %activation, {RELU}\n"
            "  %pointers.l = getelementptr inbounds i64, ptr %indptr, i64 %pointers\n"
            "  %bias.l = getelementptr inbounds float, ptr %bias, i64 %biases\n"
            + buffers + "  %first.layer = icmp eq i64 %l, 0\n"
            f"  %indices.l = select i1 %first.layer, ptr {'%first_indices' if width == 1 else '%indices'}, "
            "ptr %indices\n"
            f"  %strip = icmp eq i64 %storage, {STRIP}\n"
            + "  %not.added = xor i1 %added, true\n  %relu.now = and i1 %relu, %not.added\n"
            + ("  %by.now = load i1, ptr %by.p\n  %first.by = and i1 %first.layer, %by.now\n" if width == 1 else "")
            + (when("by.columns", "%first.by", by_columns, rows) if width == 1 else rows)
            + when("sum", "%added", f"  %sum.count = mul i64 %rows, {width}\n"
                   "  call void @residual(ptr %to, ptr %res, i64 %sum.count, i1 %relu)\n")
            + "  store ptr %to.base, ptr %result.p\n")
    layers = loop("l", 0, "%count.n", step)
    unit = (f"  %r.row = mul i64 %u, {width}\n  %r.i = add i64 %r.row, %m\n" + load("r", "float", "%result", "%r.i")
            + "  %out.i = add i64 %target.at, %u\n" + store("r", "float", "%r", "%out", "%out.i"))
    poisoned = ("  %in.at = mul i64 %target, %stride\n  %in.row = getelementptr inbounds float, ptr %x, i64 %in.at\n"
                "  %out.row = getelementptr inbounds float, ptr %out, i64 %target.at\n"
                "  call void @poison(ptr %in.row, ptr %checked, i64 %checked_count.n, ptr %out.row, i64 %outputs.n)\n")
    image = ("  %target = add i64 %t, %m\n  %target.at = mul i64 %target, %outputs.n\n"
             + loop("u", "%written", "%outputs.n", unit) + when("suspect", "%suspect", poisoned))
    if width == 1:
        outputs = "  %written = add i64 0, 0\n"
    else:
        outputs = (f"  %out.odd = urem i64 %outputs.n, {LANES}\n  %out.blocked = sub i64 %outputs.n, %out.odd\n"
                   "  %written = select i1 %full, i64 %out.blocked, i64 0\n"
                   + when("whole", "%full", "  %tile.at = mul i64 %t, %outputs.n\n"
                          "  %tile.out = getelementptr inbounds float, ptr %out, i64 %tile.at\n"
                          f"  call void @scatter(ptr %result, i64 {width}, ptr %tile.out, i64 %outputs.n)\n"))
    row = ("  %s.image = add i64 %t, %s\n  %s.at = mul i64 %s.image, %stride\n"
           "  %s.row = getelementptr inbounds float, ptr %x, i64 %s.at\n"
           "  call void @summed(ptr %s.row, i64 %inputs.n, ptr %total.p)\n")
    checked = ("  store float 0.0, ptr %total.p\n" + loop("s", 0, "%images", row)
               + "  %total = load float, ptr %total.p\n  %total.d = fsub float %total, %total\n"
               "  %suspect = fcmp uno float %total.d, 0.0\n")  # a NaN or infinity, or an overflow
    tile = (f"  %rest = sub i64 %last, %t\n  %short = icmp ult i64 %rest, {width}\n"
            f"  %images = select i1 %short, i64 %rest, i64 {width}\n  %full = icmp eq i64 %images, {width}\n"
            + checked + inputs + layers + "  %result = load ptr, ptr %result.p\n" + outputs
            + loop("m", 0, "%images", image))
    body += loop("t", "%first", "%last", tile, width)
    return function(f"void @run_{width}(ptr noalias %plan, ptr noalias %scales, ptr noalias %x, i64 %stride, "
                    "i64 %first, i64 %last, ptr noalias %out, ptr noalias %one, ptr noalias %two)", body,
                    counters=("t", "s", "g", "b", "l", "m", "u", "lit"),
                    slots=[("result", "ptr"), ("total", "float"), ("by", "i1")])


def residual():
    """IR of @residual: b = activation(b + addend), `count` floats each (a layer's outputs and those of
    the layer its sum adds, both as the kernel holds them)."""
    add = (load("made", "float", "%b", "%i") + load("r", "float", "%addend", "%i") + "  %s = fadd float %made, %r\n"
           "  %neg = fcmp olt float %s, 0.0\n  %clip = select i1 %neg, float 0.0, float %s\n"
           "  %y = select i1 %relu, float %clip, float %s\n" + store("y", "float", "%y", "%b", "%i"))
    return function("internal void @residual(ptr noalias %b, ptr noalias %addend, i64 %count, i1 %relu)",
                    loop("i", 0, "%count", add), counters=("i",))


def one_image():
    """IR of @run_image(image, x, out): one image x through run_1 into out, the model's other
    arguments (IMAGE, in order) read from `image`: a call from Python converts three arguments, not
    nine (a few tenths of a microsecond, of a call of a few microseconds)."""
    body = "".join(load(f"{name}.n", "i64", "%image", k) for k, name in enumerate(IMAGE))
    body += "".join(f"  %{name} = inttoptr i64 %{name}.n to ptr\n" for name in ("plan", "scales", "one", "two"))
    body += ("  call void @run_1(ptr %plan, ptr %scales, ptr %x, i64 %inputs.n, i64 0, i64 1, ptr %out, ptr %one, "
             "ptr %two)\n")
    return function("void @run_image(ptr noalias %image, ptr noalias %x, ptr noalias %out)", body)


def source():
    """The kernel's whole LLVM module."""
    return ("declare <16 x float> @llvm.fmuladd.v16f32(<16 x float>, <16 x float>, <16 x float>)\n"
            "declare float @llvm.fmuladd.f32(float, float, float)\n"
            "declare float @llvm.vector.reduce.fadd.v16f32(float, <16 x float>)\n"
            "declare <8 x float> @llvm.fmuladd.v8f32(<8 x float>, <8 x float>, <8 x float>)\n"
            + layer_of_one() + "".join(layer(w) for w in TILES[1:]) + strips_of_one() + "".join(map(strips, TILES[1:]))
            + DECLARATIONS + nonzero() + columns_1()
            + transpose() + gather() + scatter() + pick()
            + summed() + poison() + residual()
            + "".join(driver(w) for w in TILES) + one_image())


@functools.cache
def available():
    """Whether llvmlite, which compiles the kernel, can be imported."""
    import importlib.util
    return importlib.util.find_spec("llvmlite") is not None


@functools.cache
def compiled():
    """(the engine that holds the code, {tile: run_<tile>}, run_image), callable from Python, compiled
    once a process for this CPU. run_image keeps the GIL while it runs (under a microsecond a call
    less than giving it up and taking it back, and no two threads in it at once)."""
    from pruning import jit

    engine, runs = jit.compiled(source(), [f"run_{w}" for w in TILES], ARGUMENTS)
    image = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        engine.get_function_address("run_image"))
    return engine, {w: runs[f"run_{w}"] for w in TILES}, image
