"""The sparse kernel: a chain of fully connected layers, each stored as compressed sparse rows,
run on a batch in one compiled call. It is written in LLVM's language and compiled by llvmlite
(which numba is built on) for the CPU it runs on, the first time a model is prepared for
inference (a tenth of a second). Imported only then.

The batch is cut into tiles of 16, 32 or 64 images. A tile's activations are held feature-major,
(features, images), so that one input feature of the tile is one, two or four vectors of 16 floats.
Each output unit of the tile is summed in vector registers over its row's stored weights, each
weight times the vectors of the input feature it reads, two weights at a time, and stored once.
A tile of one image (batch 1) sums each output unit in a register instead, and reads a layer
stored dense as a contiguous dot product. Every pointer the kernel is given is marked as not
overlapping any other, so nothing is reloaded or checked inside its loops."""

import ctypes
import functools

import numpy as np

NONE, RELU = 0, 1  # activation after a layer
SPARSE, SHARED, DENSE = 0, 1, 2  # how a layer's rows are stored: each its non-zeros; every row the same
# columns (the input's columns a first layer reads); every row all columns, in order
BLOCK = 4  # rows of a layer stored whole computed together, each input vector loaded once for them
LANES = 16  # floats in a vector: one AVX-512 register, two AVX2 ones
TILES = (1, 16, 32, 64)  # the images a tile may hold
FIELDS = 5  # a layer's entry in the layer table: rows, where its row pointers start, where its biases
# start, activation, storage


def splat(name, value):
    """IR setting <16 x float> %name to the float %value in every lane."""
    return (f"  %{name}.one = insertelement <16 x float> poison, float {value}, i64 0\n"
            f"  %{name} = shufflevector <16 x float> %{name}.one, <16 x float> poison, <16 x i32> zeroinitializer\n")


def tile_layer(width):
    """IR of @layer_<width>: b = activation(W a + bias) on a tile of `width` images (a multiple of
    16), a and b feature-major. Two sets of accumulators take alternate weights of a row, so that
    each vector's sum waits on its last addition only every other weight."""
    vectors, sets = width // LANES, (0, 1)
    accumulators = "".join(f"  %acc{s}{v}.p = alloca <16 x float>\n" for s in sets for v in range(vectors))
    reset = "".join(f"  store <16 x float> {'%bias.v' if s == 0 else 'zeroinitializer'}, ptr %acc{s}{v}.p\n"
                    for s in sets for v in range(vectors))

    def weight(s, k, tag):
        """IR adding weight k (an i64) to accumulator set s, its values named after tag."""
        lines = [f"  %{tag}w.p = getelementptr inbounds float, ptr %data, i64 {k}",
                 f"  %{tag}w = load float, ptr %{tag}w.p",
                 splat(f"{tag}w.v", f"%{tag}w").rstrip("\n"),
                 f"  %{tag}c.p = getelementptr inbounds i32, ptr %indices, i64 {k}",
                 f"  %{tag}c = load i32, ptr %{tag}c.p",
                 f"  %{tag}c.wide = zext i32 %{tag}c to i64",
                 f"  %{tag}x.at = mul i64 %{tag}c.wide, {width}"]
        for v in range(vectors):
            lines += [f"  %{tag}x{v}.i = add i64 %{tag}x.at, {v * LANES}",
                      f"  %{tag}x{v}.p = getelementptr inbounds float, ptr %a, i64 %{tag}x{v}.i",
                      f"  %{tag}x{v} = load <16 x float>, ptr %{tag}x{v}.p, align 4",
                      f"  %{tag}acc{v} = load <16 x float>, ptr %acc{s}{v}.p",
                      f"  %{tag}sum{v} = call fast <16 x float> @llvm.fmuladd.v16f32(<16 x float> %{tag}w.v, "
                      f"<16 x float> %{tag}x{v}, <16 x float> %{tag}acc{v})",
                      f"  store <16 x float> %{tag}sum{v}, ptr %acc{s}{v}.p"]
        return "\n".join(lines) + "\n"

    store = "".join(
        f"  %y0{v} = load <16 x float>, ptr %acc0{v}.p\n"
        f"  %y1{v} = load <16 x float>, ptr %acc1{v}.p\n"
        f"  %y{v} = fadd fast <16 x float> %y0{v}, %y1{v}\n"
        f"  %neg{v} = fcmp olt <16 x float> %y{v}, zeroinitializer\n"
        f"  %clip{v} = select <16 x i1> %neg{v}, <16 x float> zeroinitializer, <16 x float> %y{v}\n"
        f"  %out{v} = select i1 %relu, <16 x float> %clip{v}, <16 x float> %y{v}\n"
        f"  %o{v}.i = add i64 %o, {v * LANES}\n"
        f"  %o{v}.p = getelementptr inbounds float, ptr %b, i64 %o{v}.i\n"
        f"  store <16 x float> %out{v}, ptr %o{v}.p, align 4\n" for v in range(vectors))
    block_accumulators = "".join(f"  %d{r}{v}.p = alloca <16 x float>\n" for r in range(BLOCK)
                                 for v in range(vectors))
    block_reset = "".join(f"  %bb{r}.i = add i64 %bi, {r}\n"
                          f"  %bb{r}.p = getelementptr inbounds float, ptr %bias, i64 %bb{r}.i\n"
                          f"  %bb{r} = load float, ptr %bb{r}.p\n" + splat(f"bb{r}.v", f"%bb{r}")
                          + "".join(f"  store <16 x float> %bb{r}.v, ptr %d{r}{v}.p\n" for v in range(vectors))
                          + f"  %wrow{r}.at = mul i64 %cols, {r}\n"
                          f"  %wrow{r} = add i64 %bstart, %wrow{r}.at\n" for r in range(BLOCK))
    block_column = "".join(f"  %cx{v}.i = add i64 %ca, {v * LANES}\n"
                           f"  %cx{v}.p = getelementptr inbounds float, ptr %a, i64 %cx{v}.i\n"
                           f"  %cx{v} = load <16 x float>, ptr %cx{v}.p, align 4\n" for v in range(vectors))
    for r in range(BLOCK):
        block_column += (f"  %cw{r}.i = add i64 %wrow{r}, %kk\n"
                         f"  %cw{r}.p = getelementptr inbounds float, ptr %data, i64 %cw{r}.i\n"
                         f"  %cw{r} = load float, ptr %cw{r}.p\n" + splat(f"cw{r}.v", f"%cw{r}"))
        block_column += "".join(
            f"  %cd{r}{v} = load <16 x float>, ptr %d{r}{v}.p\n"
            f"  %ce{r}{v} = call fast <16 x float> @llvm.fmuladd.v16f32(<16 x float> %cw{r}.v, <16 x float> %cx{v}, "
            f"<16 x float> %cd{r}{v})\n"
            f"  store <16 x float> %ce{r}{v}, ptr %d{r}{v}.p\n" for v in range(vectors))
    block_store = "".join(
        f"  %bs{r}{v} = load <16 x float>, ptr %d{r}{v}.p\n"
        f"  %bneg{r}{v} = fcmp olt <16 x float> %bs{r}{v}, zeroinitializer\n"
        f"  %bclip{r}{v} = select <16 x i1> %bneg{r}{v}, <16 x float> zeroinitializer, <16 x float> %bs{r}{v}\n"
        f"  %bout{r}{v} = select i1 %relu, <16 x float> %bclip{r}{v}, <16 x float> %bs{r}{v}\n"
        f"  %bo{r}{v}.i = add i64 %ob, {r * width + v * LANES}\n"
        f"  %bo{r}{v}.p = getelementptr inbounds float, ptr %b, i64 %bo{r}{v}.i\n"
        f"  store <16 x float> %bout{r}{v}, ptr %bo{r}{v}.p, align 4\n" for r in range(BLOCK) for v in range(vectors))
    return f"""
define internal void @layer_{width}(i64 %rows, ptr noalias %indptr, ptr noalias %indices, ptr noalias %data,
                                   ptr noalias %bias, i1 %relu, i64 %storage, ptr noalias %a, ptr noalias %b) {{
entry:
  %i.p = alloca i64
  %k.p = alloca i64
{accumulators}{block_accumulators}  %shared = icmp ne i64 %storage, {SPARSE}
  %ragged = urem i64 %rows, {BLOCK}
  %whole = sub i64 %rows, %ragged
  %blocked = select i1 %shared, i64 %whole, i64 0
  store i64 0, ptr %i.p
  br label %each.block
each.block:
  %bi = load i64, ptr %i.p
  %b.more = icmp ult i64 %bi, %blocked
  br i1 %b.more, label %block, label %each.row
block:
  %bstart.p = getelementptr inbounds i64, ptr %indptr, i64 %bi
  %bstart = load i64, ptr %bstart.p
  %bi.second = add i64 %bi, 1
  %bend.p = getelementptr inbounds i64, ptr %indptr, i64 %bi.second
  %bend = load i64, ptr %bend.p
  %cols = sub i64 %bend, %bstart
{block_reset}  store i64 0, ptr %k.p
  br label %each.column
each.column:
  %kk = load i64, ptr %k.p
  %kk.more = icmp ult i64 %kk, %cols
  br i1 %kk.more, label %column, label %block.store
column:
  %ci.at = add i64 %bstart, %kk
  %ci.p = getelementptr inbounds i32, ptr %indices, i64 %ci.at
  %ci = load i32, ptr %ci.p
  %ci.wide = zext i32 %ci to i64
  %ca = mul i64 %ci.wide, {width}
{block_column}  %kk.next = add i64 %kk, 1
  store i64 %kk.next, ptr %k.p
  br label %each.column
block.store:
  %ob = mul i64 %bi, {width}
{block_store}  %bi.next = add i64 %bi, {BLOCK}
  store i64 %bi.next, ptr %i.p
  br label %each.block
each.row:
  %i = load i64, ptr %i.p
  %more = icmp ult i64 %i, %rows
  br i1 %more, label %row, label %done
row:
  %bias.p = getelementptr inbounds float, ptr %bias, i64 %i
  %bias.s = load float, ptr %bias.p
{splat("bias.v", "%bias.s")}{reset}  %start.p = getelementptr inbounds i64, ptr %indptr, i64 %i
  %start = load i64, ptr %start.p
  %next = add i64 %i, 1
  %end.p = getelementptr inbounds i64, ptr %indptr, i64 %next
  %end = load i64, ptr %end.p
  store i64 %start, ptr %k.p
  br label %pairs
pairs:
  %k = load i64, ptr %k.p
  %k.second = add i64 %k, 1
  %two.left = icmp ult i64 %k.second, %end
  br i1 %two.left, label %pair, label %last
pair:
{weight(0, "%k", "p")}{weight(1, "%k.second", "q")}  %k.next = add i64 %k, 2
  store i64 %k.next, ptr %k.p
  br label %pairs
last:
  %one.left = icmp ult i64 %k, %end
  br i1 %one.left, label %single, label %store
single:
{weight(0, "%k", "s")}  br label %store
store:
  %o = mul i64 %i, {width}
{store}  store i64 %next, ptr %i.p
  br label %each.row
done:
  ret void
}}
"""


LAYER_OF_ONE = """
define internal void @layer_1(i64 %rows, ptr noalias %indptr, ptr noalias %indices, ptr noalias %data,
                              ptr noalias %bias, i1 %relu, i64 %storage, ptr noalias %a, ptr noalias %b) {
entry:
  %dense = icmp ne i64 %storage, {SPARSE}
  %i.p = alloca i64
  %k.p = alloca i64
  %sum.p = alloca float
  store i64 0, ptr %i.p
  br label %each.row
each.row:
  %i = load i64, ptr %i.p
  %more = icmp ult i64 %i, %rows
  br i1 %more, label %row, label %done
row:
  %bias.p = getelementptr inbounds float, ptr %bias, i64 %i
  %bias.s = load float, ptr %bias.p
  store float %bias.s, ptr %sum.p
  %start.p = getelementptr inbounds i64, ptr %indptr, i64 %i
  %start = load i64, ptr %start.p
  %next = add i64 %i, 1
  %end.p = getelementptr inbounds i64, ptr %indptr, i64 %next
  %end = load i64, ptr %end.p
  store i64 %start, ptr %k.p
  br i1 %dense, label %dots, label %weights
weights:
  %k = load i64, ptr %k.p
  %left = icmp ult i64 %k, %end
  br i1 %left, label %weight, label %store
weight:
  %w.p = getelementptr inbounds float, ptr %data, i64 %k
  %w = load float, ptr %w.p
  %c.p = getelementptr inbounds i32, ptr %indices, i64 %k
  %c = load i32, ptr %c.p
  %c.wide = zext i32 %c to i64
  %x.p = getelementptr inbounds float, ptr %a, i64 %c.wide
  %x = load float, ptr %x.p
  %sum = load float, ptr %sum.p
  %wx = fmul fast float %w, %x
  %sum.next = fadd fast float %sum, %wx
  store float %sum.next, ptr %sum.p
  %k.next = add i64 %k, 1
  store i64 %k.next, ptr %k.p
  br label %weights
dots:
  %j = load i64, ptr %k.p
  %dot.left = icmp ult i64 %j, %end
  br i1 %dot.left, label %dot, label %store
dot:
  %v.p = getelementptr inbounds float, ptr %data, i64 %j
  %v = load float, ptr %v.p
  %col = sub i64 %j, %start
  %y.p = getelementptr inbounds float, ptr %a, i64 %col
  %y = load float, ptr %y.p
  %part = load float, ptr %sum.p
  %vy = fmul fast float %v, %y
  %part.next = fadd fast float %part, %vy
  store float %part.next, ptr %sum.p
  %j.next = add i64 %j, 1
  store i64 %j.next, ptr %k.p
  br label %dots
store:
  %total = load float, ptr %sum.p
  %neg = fcmp olt float %total, 0.0
  %clip = select i1 %neg, float 0.0, float %total
  %out = select i1 %relu, float %clip, float %total
  %o.p = getelementptr inbounds float, ptr %b, i64 %i
  store float %out, ptr %o.p
  store i64 %next, ptr %i.p
  br label %each.row
done:
  ret void
}
""".replace("{SPARSE}", str(SPARSE))


def transpose():
    """IR of @transpose: 16 images' 16 consecutive inputs (rows of src, `stride` floats apart),
    normalised as (x - shift) * inverse, stored feature-major (rows of dst, `width` apart). Four
    rounds of shuffles, each exchanging one bit of the image number with one bit of the input's."""
    lines = []
    for r in range(LANES):
        lines += [f"  %src{r}.i = mul i64 {r}, %stride",
                  f"  %src{r}.p = getelementptr inbounds float, ptr %src, i64 %src{r}.i",
                  f"  %raw{r} = load <16 x float>, ptr %src{r}.p, align 4",
                  f"  %centred{r} = fsub <16 x float> %raw{r}, %shift.v",
                  f"  %v0.{r} = fmul <16 x float> %centred{r}, %inverse.v"]
    for round_, bit in enumerate((1, 2, 4, 8)):
        low = ", ".join(f"i32 {lane if not lane & bit else 16 + (lane ^ bit)}" for lane in range(LANES))
        high = ", ".join(f"i32 {lane | bit if not lane & bit else 16 + lane}" for lane in range(LANES))
        for r in range(LANES):
            if r & bit:
                continue
            a, b = f"%v{round_}.{r}", f"%v{round_}.{r | bit}"
            lines += [f"  %v{round_ + 1}.{r} = shufflevector <16 x float> {a}, <16 x float> {b}, <16 x i32> <{low}>",
                      f"  %v{round_ + 1}.{r | bit} = shufflevector <16 x float> {a}, <16 x float> {b}, "
                      f"<16 x i32> <{high}>"]
    for c in range(LANES):
        lines += [f"  %dst{c}.i = mul i64 {c}, %width",
                  f"  %dst{c}.p = getelementptr inbounds float, ptr %dst, i64 %dst{c}.i",
                  f"  store <16 x float> %v4.{c}, ptr %dst{c}.p, align 4"]
    body = "\n".join(lines)
    return f"""
define internal void @transpose(ptr noalias %src, i64 %stride, ptr noalias %dst, i64 %width, float %shift,
                                float %inverse) alwaysinline {{
entry:
{splat("shift.v", "%shift")}{splat("inverse.v", "%inverse")}{body}
  ret void
}}
"""


GATHER = """
define internal void @gather(ptr noalias %x, i64 %stride, i64 %first, i64 %images, i64 %from, i64 %to,
                             ptr noalias %a, i64 %width, float %shift, float %inverse) {
entry:
  %n.p = alloca i64
  %c.p = alloca i64
  store i64 0, ptr %n.p
  br label %each.image
each.image:
  %n = load i64, ptr %n.p
  %n.more = icmp ult i64 %n, %width
  br i1 %n.more, label %image, label %done
image:
  %inside = icmp ult i64 %n, %images
  %at = add i64 %first, %n
  %row.at = mul i64 %at, %stride
  %row = getelementptr inbounds float, ptr %x, i64 %row.at
  store i64 %from, ptr %c.p
  br label %each.input
each.input:
  %c = load i64, ptr %c.p
  %c.more = icmp ult i64 %c, %to
  br i1 %c.more, label %input, label %image.next
input:
  br i1 %inside, label %read, label %write
read:
  %pixel.p = getelementptr inbounds float, ptr %row, i64 %c
  %pixel = load float, ptr %pixel.p
  %centred = fsub float %pixel, %shift
  %scaled = fmul float %centred, %inverse
  br label %write
write:
  %value = phi float [0.0, %input], [%scaled, %read]
  %a.row = mul i64 %c, %width
  %a.i = add i64 %a.row, %n
  %a.p = getelementptr inbounds float, ptr %a, i64 %a.i
  store float %value, ptr %a.p
  %c.next = add i64 %c, 1
  store i64 %c.next, ptr %c.p
  br label %each.input
image.next:
  %n.next = add i64 %n, 1
  store i64 %n.next, ptr %n.p
  br label %each.image
done:
  ret void
}
"""
SCATTER = """
define internal void @scatter(ptr noalias %result, i64 %width, ptr noalias %out, i64 %outputs) {
entry:
  %g.p = alloca i64
  %o.p = alloca i64
  %ragged = urem i64 %outputs, 16
  %blocked = sub i64 %outputs, %ragged
  store i64 0, ptr %g.p
  br label %each.group
each.group:
  %g = load i64, ptr %g.p
  %g.more = icmp ult i64 %g, %width
  br i1 %g.more, label %group, label %done
group:
  %image.at = mul i64 %g, %outputs
  store i64 0, ptr %o.p
  br label %each.block
each.block:
  %o = load i64, ptr %o.p
  %o.more = icmp ult i64 %o, %blocked
  br i1 %o.more, label %block, label %group.next
block:
  %src.row = mul i64 %o, %width
  %src.at = add i64 %src.row, %g
  %src = getelementptr inbounds float, ptr %result, i64 %src.at
  %dst.at = add i64 %image.at, %o
  %dst = getelementptr inbounds float, ptr %out, i64 %dst.at
  call void @transpose(ptr %src, i64 %width, ptr %dst, i64 %outputs, float 0.0, float 1.0)
  %o.next = add i64 %o, 16
  store i64 %o.next, ptr %o.p
  br label %each.block
group.next:
  %g.next = add i64 %g, 16
  store i64 %g.next, ptr %g.p
  br label %each.group
done:
  ret void
}
"""
PICK = """
define internal void @pick(ptr noalias %row, ptr noalias %columns, i64 %count, ptr noalias %a, float %shift,
                           float %inverse) {
entry:
  %j.p = alloca i64
  store i64 0, ptr %j.p
  br label %each.column
each.column:
  %j = load i64, ptr %j.p
  %more = icmp ult i64 %j, %count
  br i1 %more, label %column, label %done
column:
  %c.p = getelementptr inbounds i64, ptr %columns, i64 %j
  %c = load i64, ptr %c.p
  %pixel.p = getelementptr inbounds float, ptr %row, i64 %c
  %pixel = load float, ptr %pixel.p
  %centred = fsub float %pixel, %shift
  %scaled = fmul float %centred, %inverse
  %a.p = getelementptr inbounds float, ptr %a, i64 %j
  store float %scaled, ptr %a.p
  %j.next = add i64 %j, 1
  store i64 %j.next, ptr %j.p
  br label %each.column
done:
  ret void
}
"""
PLAN = ("layers", "count", "indptr", "indices", "data", "bias", "blocks", "block_count", "inputs", "outputs",
        "columns", "column_count", "first_indices")


def driver(width):
    """IR of @run_<width>: images first..last of x (rows `stride` floats apart) through every layer
    in tiles of `width`, into out. `plan` holds the model (PLAN's fields, in order), `scales` the
    input normalisation (shift, inverse). A full tile's inputs are transposed 16 by 16 in the
    blocks of 16 inputs some weight reads; the last inputs (past a multiple of 16) and a part tile
    (zero past the batch's end) are gathered one by one. one and two are the tile's two buffers,
    each of width times the widest layer's floats (the input counts)."""
    fields = "".join(f"  %{name}.p = getelementptr inbounds i64, ptr %plan, i64 {k}\n"
                     f"  %{name}.n = load i64, ptr %{name}.p\n" for k, name in enumerate(PLAN))
    pointers = "".join(f"  %{name} = inttoptr i64 %{name}.n to ptr\n"
                       for name in ("layers", "indptr", "indices", "data", "bias", "blocks", "columns",
                                    "first_indices"))
    gather_tile = f"""  %full = icmp eq i64 %images, {width}
  br i1 %full, label %blocks.start, label %gather.all
gather.all:
  call void @gather(ptr %x, i64 %stride, i64 %t, i64 %images, i64 0, i64 %inputs.n, ptr %one, i64 {width},
                    float %shift, float %inverse)
  br label %run.layers
blocks.start:
  store i64 0, ptr %g.p
  br label %each.group
each.group:
  %g = load i64, ptr %g.p
  %g.more = icmp ult i64 %g, {width // LANES}
  br i1 %g.more, label %group, label %tail
group:
  %g.image = mul i64 %g, {LANES}
  %g.first = add i64 %t, %g.image
  %g.at = mul i64 %g.first, %stride
  %g.src = getelementptr inbounds float, ptr %x, i64 %g.at
  store i64 0, ptr %b.p
  br label %each.block
each.block:
  %b = load i64, ptr %b.p
  %b.more = icmp ult i64 %b, %block_count.n
  br i1 %b.more, label %block, label %group.next
block:
  %start.p = getelementptr inbounds i64, ptr %blocks, i64 %b
  %start = load i64, ptr %start.p
  %src = getelementptr inbounds float, ptr %g.src, i64 %start
  %dst.row = mul i64 %start, {width}
  %dst.at = add i64 %dst.row, %g.image
  %dst = getelementptr inbounds float, ptr %one, i64 %dst.at
  call void @transpose(ptr %src, i64 %stride, ptr %dst, i64 {width}, float %shift, float %inverse)
  %b.next = add i64 %b, 1
  store i64 %b.next, ptr %b.p
  br label %each.block
group.next:
  %g.next = add i64 %g, 1
  store i64 %g.next, ptr %g.p
  br label %each.group
tail:
  %odd = urem i64 %inputs.n, {LANES}
  %tail.from = sub i64 %inputs.n, %odd
  call void @gather(ptr %x, i64 %stride, i64 %t, i64 %images, i64 %tail.from, i64 %inputs.n, ptr %one,
                    i64 {width}, float %shift, float %inverse)
  br label %run.layers
""" if width > 1 else """  %image.at = mul i64 %t, %stride
  %image = getelementptr inbounds float, ptr %x, i64 %image.at
  call void @pick(ptr %image, ptr %columns, i64 %column_count.n, ptr %one, float %shift, float %inverse)
  br label %run.layers
"""
    scatter = f"""  %whole.tile = icmp eq i64 %images, {width}
  %out.ragged = urem i64 %outputs.n, {LANES}
  %out.blocked = sub i64 %outputs.n, %out.ragged
  %written = select i1 %whole.tile, i64 %out.blocked, i64 0
  br i1 %whole.tile, label %scatter, label %scattered
scatter:
  %tile.at = mul i64 %t, %outputs.n
  %tile.out = getelementptr inbounds float, ptr %out, i64 %tile.at
  call void @scatter(ptr %result, i64 {width}, ptr %tile.out, i64 %outputs.n)
  br label %scattered
scattered:
""" if width > 1 else "  %written = add i64 0, 0\n"
    return f"""
define void @run_{width}(ptr noalias %plan, ptr noalias %scales, ptr noalias %x, i64 %stride, i64 %first,
                         i64 %last, ptr noalias %out, ptr noalias %one, ptr noalias %two) {{
entry:
  %t.p = alloca i64
  %g.p = alloca i64
  %b.p = alloca i64
  %n.p = alloca i64
  %j.p = alloca i64
  %l.p = alloca i64
  %from.p = alloca ptr
  %to.p = alloca ptr
{fields}{pointers}  %shift = load float, ptr %scales
  %inverse.p = getelementptr inbounds float, ptr %scales, i64 1
  %inverse = load float, ptr %inverse.p
  store i64 %first, ptr %t.p
  br label %tiles
tiles:
  %t = load i64, ptr %t.p
  %more = icmp ult i64 %t, %last
  br i1 %more, label %tile, label %done
tile:
  %rest = sub i64 %last, %t
  %short = icmp ult i64 %rest, {width}
  %images = select i1 %short, i64 %rest, i64 {width}
{gather_tile}run.layers:
  store i64 0, ptr %l.p
  store ptr %one, ptr %from.p
  store ptr %two, ptr %to.p
  br label %layer.loop
layer.loop:
  %l = load i64, ptr %l.p
  %l.more = icmp ult i64 %l, %count.n
  br i1 %l.more, label %layer, label %write
layer:
  %info.at = mul i64 %l, {FIELDS}
  %info = getelementptr inbounds i64, ptr %layers, i64 %info.at
  %rows = load i64, ptr %info
  %pointers.p = getelementptr inbounds i64, ptr %info, i64 1
  %pointers = load i64, ptr %pointers.p
  %biases.p = getelementptr inbounds i64, ptr %info, i64 2
  %biases = load i64, ptr %biases.p
  %activation.p = getelementptr inbounds i64, ptr %info, i64 3
  %activation = load i64, ptr %activation.p
  %storage.p = getelementptr inbounds i64, ptr %info, i64 4
  %storage = load i64, ptr %storage.p
  %relu = icmp eq i64 %activation, {RELU}
  %indptr.l = getelementptr inbounds i64, ptr %indptr, i64 %pointers
  %bias.l = getelementptr inbounds float, ptr %bias, i64 %biases
  %from = load ptr, ptr %from.p
  %to = load ptr, ptr %to.p
  %first.layer = icmp eq i64 %l, 0
  %indices.l = select i1 %first.layer, ptr {"%first_indices" if width == 1 else "%indices"}, ptr %indices
  call void @layer_{width}(i64 %rows, ptr %indptr.l, ptr %indices.l, ptr %data, ptr %bias.l, i1 %relu, i64 %storage,
                           ptr %from, ptr %to)
  store ptr %to, ptr %from.p
  store ptr %from, ptr %to.p
  %l.next = add i64 %l, 1
  store i64 %l.next, ptr %l.p
  br label %layer.loop
write:
  %result = load ptr, ptr %from.p
{scatter}  store i64 0, ptr %n.p
  br label %write.images
write.images:
  %m = load i64, ptr %n.p
  %m.more = icmp ult i64 %m, %images
  br i1 %m.more, label %write.image, label %tile.next
write.image:
  %target = add i64 %t, %m
  %target.at = mul i64 %target, %outputs.n
  store i64 %written, ptr %j.p
  br label %write.units
write.units:
  %u = load i64, ptr %j.p
  %u.more = icmp ult i64 %u, %outputs.n
  br i1 %u.more, label %write.unit, label %write.next
write.unit:
  %r.row = mul i64 %u, {width}
  %r.i = add i64 %r.row, %m
  %r.p = getelementptr inbounds float, ptr %result, i64 %r.i
  %r = load float, ptr %r.p
  %out.i = add i64 %target.at, %u
  %out.p = getelementptr inbounds float, ptr %out, i64 %out.i
  store float %r, ptr %out.p
  %u.next = add i64 %u, 1
  store i64 %u.next, ptr %j.p
  br label %write.units
write.next:
  %m.next = add i64 %m, 1
  store i64 %m.next, ptr %n.p
  br label %write.images
tile.next:
  %t.next = add i64 %t, {width}
  store i64 %t.next, ptr %t.p
  br label %tiles
done:
  ret void
}}
"""


def source():
    """The kernel's whole LLVM module."""
    return ("declare <16 x float> @llvm.fmuladd.v16f32(<16 x float>, <16 x float>, <16 x float>)\n"
            + LAYER_OF_ONE + "".join(tile_layer(w) for w in TILES[1:]) + transpose() + GATHER + SCATTER + PICK
            + "".join(driver(w) for w in TILES))


ARGUMENTS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]


@functools.cache
def compiled():
    """{tile width: the compiled run_<width>, callable from Python}: compiled once a process, for
    this CPU. The engine that holds the code is kept with them."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
    module = llvm.parse_assembly(source())
    module.triple, module.data_layout = machine.triple, str(machine.target_data)
    module.verify()
    tuning = llvm.create_pipeline_tuning_options(speed_level=3)
    tuning.loop_vectorization = tuning.slp_vectorization = True
    builder = llvm.create_pass_builder(machine, tuning)
    builder.getModulePassManager().run(module, builder)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    kind = ctypes.CFUNCTYPE(None, *ARGUMENTS)
    return engine, {w: kind(engine.get_function_address(f"run_{w}")) for w in TILES}
